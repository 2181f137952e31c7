from eplb.cli import entry

entry()
