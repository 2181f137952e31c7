"""The one error type eplb raises for bad input.

Every message names the problem and the fix, so the CLI can print it as a single line.
"""


class EplbError(ValueError):
    """Bad input to eplb: the message says what is wrong and how to fix it."""
