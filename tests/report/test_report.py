import json

import pytest
import torch

from eplb.cli import run
from eplb.report import compare_section, simulation_sections, write_report
from eplb.report.pages import step_cells, summary_cells
from eplb.simulation import CostModel, Periodic, SimResult, simulate
from tests.simulation.helpers import CLUSTER, phase_loads, small_scenario, write_fixture_table

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cost = CostModel(table=str(write_fixture_table(tmp_path_factory.mktemp("t") / "t.json")))
    sc = small_scenario(steps=6)
    return [simulate(sc, ["static", Periodic(interval=4, window=4), "eplb", "oracle"], **CLUSTER, cost=cost,
                     waterfill=w) for w in (False, True)]


def test_report_files_are_written_valid_and_match_the_simulator(tmp_path, results):
    load = torch.stack(phase_loads(2))
    sections = [compare_section(load, [5, 6], "two phases", **CLUSTER, algorithms=["linear", "deepseek", "eplb"])]
    sections += simulation_sections(results)
    written = write_report(tmp_path, sections, title="test report")
    pngs = [p for k, p in written.items() if k not in ("html", "markdown")]
    assert len(pngs) == 5  # layers, heatmap, timeline, trade-off, step times
    for p in pngs:
        assert p.read_bytes().startswith(PNG) and p.stat().st_size > 5000
    page = written["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("data:image/png;base64,") == 5
    md = written["markdown"].read_text()
    assert all(f"]({p.name})" in md for p in pngs)
    for row in results[0].summary():
        cells = summary_cells(row)
        assert "| " + " | ".join(cells) + " |" in md
        assert "".join(f"<td>{c}</td>" for c in cells) in page
        assert f"{row['max_over_mean']:.4f}" in cells
    for res in results:
        for row in res.summary():
            cells = step_cells({"dispatch": "even", "waterfill": res.setup["waterfill"], **row})
            assert "| " + " | ".join(cells) + " |" in md


def test_nothing_to_report_is_an_error(tmp_path):
    with pytest.raises(Exception, match="nothing to report"):
        write_report(tmp_path, [])


def test_cli_simulate_then_report(tmp_path, capsys):
    phases = []
    for i, load in enumerate(phase_loads(2)):
        path = tmp_path / f"phase{i}.json"
        path.write_text(json.dumps(load.tolist()))
        phases.append(str(path))
    saved = tmp_path / "run.json"
    argv = ["simulate", *phases, "--gpus", "4", "--slots", "20", "--nodes", "2", "--steps", "4", "--tokens", "200",
            "--top-k", "2", "--no-time", "--policies", "static,eplb,oracle", "--save", str(saved)]
    assert run(argv) == 0
    out = capsys.readouterr().out
    back = SimResult.load(saved)
    assert f"{back.summary()[0]['max_over_mean']:.4f}" in out and "oracle" in out
    assert run(["report", str(saved), "-o", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10000


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--gpus", "4", "--slots", "20"],
        ["simulate", "missing.json", "--gpus", "4", "--slots", "20"],
        ["report", "--stats", "x.json"],
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eplb: error:") and "\n" not in err
