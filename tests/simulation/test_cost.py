import pytest
import torch

from eplb.errors import EplbError
from eplb.simulation import CostModel, GemmTable
from eplb.simulation.cost import table_path
from tests.simulation.helpers import write_fixture_table


def test_loading_makes_the_table_monotone(tmp_path):
    table = GemmTable.load(write_fixture_table(tmp_path / "t.json", noisy=True))
    us = table.time_us
    assert bool((us[1:] >= us[:-1]).all()) and bool((us[:, 1:] >= us[:, :-1]).all())
    assert float(us[1, 0]) == 5.0  # the slow point is lowered to the later, faster one


def test_interpolation_hits_the_grid_and_is_monotone_in_tokens_and_experts(tmp_path):
    table = GemmTable.load(write_fixture_table(tmp_path / "t.json"))
    assert float(table(torch.tensor(4.0), torch.tensor(256.0))) == pytest.approx(20 * 4 + 0.05 * 4 * 256)
    g = torch.Generator().manual_seed(0)
    experts = torch.rand(2000, generator=g, dtype=torch.float64) * 12 + 0.5
    tokens = torch.rand(2000, generator=g, dtype=torch.float64) * 9000
    base = table(experts, tokens)
    assert bool((table(experts, tokens + 7.0) >= base).all())  # past the grid too (extrapolated)
    assert bool((table(experts + 0.5, tokens) >= base).all())
    assert float(table(torch.tensor(0.0), torch.tensor(10.0))) == 0.0


def test_no_table_means_no_time_model_and_the_error_names_the_benchmark(tmp_path):
    with pytest.raises(EplbError, match="bench_gemm_cost.py"):
        CostModel(table=str(tmp_path / "missing.json")).gemm  # noqa: B018


@pytest.mark.parametrize("grid", [{"experts": [2, 1]}, {"time_us": [[1.0, -1.0]] * 4}])
def test_bad_tables_are_rejected(tmp_path, grid):
    base = {"experts": [1, 2, 4, 8], "tokens": [1, 16], "time_us": [[1.0, 2.0]] * 4}
    with pytest.raises(EplbError, match="re-measure"):
        GemmTable.from_grid(**(base | grid))


def test_the_shipped_table_is_a_measurement():
    path = table_path()
    if not path.is_file():
        pytest.skip("no measured GEMM table shipped")
    for dtype in ("bf16", "fp8"):
        table = GemmTable.load(path, dtype)
        assert "H200" in table.meta["device"] and "bench_gemm_cost.py" in table.meta["command"]


def test_comm_time_grows_with_the_busiest_rank_and_copies_fp8_are_half_the_bytes():
    model = CostModel()
    even = model.comm_us(torch.full((4,), 1000.0), num_nodes=2)
    skewed = model.comm_us(torch.tensor([2500.0, 500.0, 500.0, 500.0]), num_nodes=2)
    assert float(skewed) == pytest.approx(2.5 * float(even))
    assert CostModel(dtype="fp8").bytes_per_expert * 2 == model.bytes_per_expert == 3 * 7168 * 2048 * 2
