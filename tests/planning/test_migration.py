"""Migration-aware planning: eplb.plan(current=..., max_moves=...), align, migration_cost."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import eplb
from eplb.errors import EplbError
from eplb.metrics import duplicates
from eplb.placement import EMPTY_SLOT, Placement
from eplb.planning.migration import align, migration_cost, move_within_budget


@pytest.fixture(autouse=True)
def one_thread():
    # The greedy search runs many mid-sized ops; on a shared, busy 2-core machine, intra-op
    # threads wait on each other far longer than the ops take (a 0.15 s plan took 15 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (experts, slots, GPUs, nodes) of the random cases.
SHAPES = [(16, 24, 4, 1), (12, 16, 4, 2), (10, 20, 5, 1)]
BUDGETS = [0, 1, 2, 3, 5, 8, 13, 40]


def random_placement(num_layers: int, num_experts: int, num_slots: int, num_gpus: int, num_nodes: int,
                     seed: int) -> Placement:
    """A valid placement unrelated to any load: each expert once, the spare slots random."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_layers):
        extra = torch.randint(0, num_experts, (num_slots - num_experts,), generator=gen)
        row = torch.cat([torch.arange(num_experts), extra])
        rows.append(row[torch.randperm(num_slots, generator=gen)])
    return Placement(torch.stack(rows), num_experts, num_gpus, num_nodes)


def max_load(placement: Placement, load: torch.Tensor) -> torch.Tensor:
    return placement.gpu_load(load).max(dim=1).values


def case(shape, seed, make_load):
    num_experts, num_slots, num_gpus, num_nodes = shape
    current = random_placement(5, num_experts, num_slots, num_gpus, num_nodes, seed)
    load = make_load(5, num_experts, seed=seed + 100)
    spec = dict(num_gpus=num_gpus, num_slots=num_slots, num_nodes=num_nodes)
    return current, load, spec


# Budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_budget_never_exceeded_and_balance_never_worse(shape, seed, make_load):
    current, load, spec = case(shape, seed, make_load)
    before = max_load(current, load)
    previous = before
    for budget in BUDGETS:
        new = eplb.plan(load, **spec, algorithm="deepseek", current=current, max_moves=budget)
        moves = migration_cost(current, new).moves
        assert (moves <= budget).all(), (budget, moves)
        after = max_load(new, load)
        # Balance only improves with the budget, and the budget is used when it helps.
        assert (after <= previous * (1 + 1e-9)).all(), (budget, after, previous)
        previous = after
    assert (previous < before).all()


def test_budget_is_spent_where_it_pays(make_load):
    # Every layer of a random placement under a skewed load gains from its first moves.
    current, load, spec = case(SHAPES[0], 7, make_load)
    new = eplb.plan(load, **spec, current=current, max_moves=2)
    assert migration_cost(current, new).moves.tolist() == [2] * current.num_layers


def test_zero_budget_is_identity(make_load):
    current, load, spec = case(SHAPES[0], 1, make_load)
    new = eplb.plan(load, **spec, current=current, max_moves=0)
    assert torch.equal(new.phy2log, current.phy2log)


@pytest.mark.parametrize("algorithm", ["deepseek", "linear"])
@pytest.mark.parametrize("shape", SHAPES)
def test_unlimited_reaches_ideal_with_fewer_moves(algorithm, shape, make_load):
    current, load, spec = case(shape, 3, make_load)
    ideal = eplb.plan(load, **spec, algorithm=algorithm)
    new = eplb.plan(load, **spec, algorithm=algorithm, current=current)
    # Same GPU loads up to a permutation of GPUs: the same balance, exactly.
    sorted_loads = lambda p: p.gpu_load(load).sort(dim=1).values  # noqa: E731
    torch.testing.assert_close(sorted_loads(new), sorted_loads(ideal), rtol=1e-12, atol=0)
    naive = migration_cost(current, ideal).moves
    assert (migration_cost(current, new).moves <= naive).all()
    # A budget as large as the whole placement is at least as good as the ideal.
    everything = eplb.plan(load, **spec, algorithm=algorithm, current=current, max_moves=spec["num_slots"])
    assert (max_load(everything, load) <= max_load(ideal, load) * (1 + 1e-9)).all()


def test_balanced_placement_is_left_alone():
    # Every GPU carries the same load: no move can help, so none is made, whatever the budget.
    load = torch.ones(3, 16)
    spec = dict(num_gpus=4, num_slots=16)
    current = eplb.plan(load, **spec, algorithm="linear")
    for budget in (1, 4, 16):
        new = eplb.plan(load, **spec, algorithm="deepseek", current=current, max_moves=budget)
        assert torch.equal(new.phy2log, current.phy2log)


def test_deterministic(make_load):
    current, load, spec = case(SHAPES[1], 4, make_load)
    first = eplb.plan(load, **spec, current=current, max_moves=5)
    second = eplb.plan(load.clone(), **spec, current=current, max_moves=5)
    assert torch.equal(first.phy2log, second.phy2log)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_moves_keep_every_expert_and_add_no_duplicate(shape, make_load):
    current, load, spec = case(shape, 5, make_load)
    # With the target equal to current, the result is the greedy path alone.
    for budget in (3, 8, 40):
        row = move_within_budget(current.phy2log, current.phy2log, load, spec["num_gpus"], budget)
        new = Placement(row, current.num_experts, current.num_gpus, current.num_nodes)
        assert (new.logcnt >= 1).all()
        assert (duplicates(new) <= duplicates(current)).all()


def test_empty_slots_are_used_and_counted(make_load):
    # round_robin leaves slots empty when GPUs do not divide the experts.
    load = make_load(4, 14, seed=9)
    spec = dict(num_gpus=4, num_slots=16)
    current = eplb.plan(load, **spec, algorithm="round_robin")
    assert (current.phy2log == EMPTY_SLOT).any()
    new = eplb.plan(load, **spec, algorithm="deepseek", current=current, max_moves=3)
    assert (migration_cost(current, new).moves <= 3).all()
    assert (max_load(new, load) < max_load(current, load)).all()


def test_layers_without_load_keep_their_row(make_load):
    current, load, spec = case(SHAPES[0], 6, make_load)
    load[1] = 0.0
    for budget in (None, 4):
        new = eplb.plan(load, **spec, current=current, max_moves=budget)
        assert torch.equal(new.phy2log[1], current.phy2log[1])
        assert not torch.equal(new.phy2log[0], current.phy2log[0])


def test_history_is_summed(make_load):
    current, _, spec = case(SHAPES[0], 8, make_load)
    history = make_load(5, 16, steps=3, seed=8)
    from_history = eplb.plan(history, **spec, algorithm="deepseek", current=current, max_moves=4)
    from_sum = eplb.plan(history.sum(0), **spec, algorithm="deepseek", current=current, max_moves=4)
    assert torch.equal(from_history.phy2log, from_sum.phy2log)


# Alignment -------------------------------------------------------------------------------------


def gpu_multisets(phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L, G, S]``: each GPU's experts, sorted."""
    return phy2log.view(phy2log.shape[0], num_gpus, -1).sort(dim=-1).values


@pytest.mark.parametrize("shape", SHAPES)
def test_align_only_permutes_gpus_and_slots(shape, make_load):
    num_experts, num_slots, num_gpus, num_nodes = shape
    current = random_placement(4, num_experts, num_slots, num_gpus, num_nodes, seed=11)
    target = random_placement(4, num_experts, num_slots, num_gpus, num_nodes, seed=12)
    out = align(current.phy2log, target.phy2log, num_gpus, num_nodes)
    per_node = num_gpus // num_nodes
    got, want = gpu_multisets(out, num_gpus), gpu_multisets(target.phy2log, num_gpus)
    for layer in range(4):
        for node in range(num_nodes):
            block = slice(node * per_node, (node + 1) * per_node)
            # The GPUs of a node come from one node of the target.
            matches = [
                sorted(map(tuple, got[layer, block].tolist()))
                == sorted(map(tuple, want[layer, other * per_node:(other + 1) * per_node].tolist()))
                for other in range(num_nodes)
            ]
            assert any(matches)
    assert ((out != current.phy2log).sum(1) <= (target.phy2log != current.phy2log).sum(1)).all()


def test_align_keeps_slots_of_experts_that_stay():
    # GPU 0 keeps experts 0 and 1 (in their slots), GPU 1 keeps 3; the target lists them shuffled.
    current = torch.tensor([[0, 1, 2, 3, 4, 5]])
    target = torch.tensor([[3, 6, 7, 1, 0, 8]])
    out = align(current, target, num_gpus=2)
    assert out.tolist() == [[0, 1, 8, 3, 6, 7]]


def test_align_without_gpu_permutation_keeps_gpus():
    current = torch.tensor([[0, 1, 2, 3, 4, 5]])
    target = torch.tensor([[4, 3, 0, 2, 5, 1]])
    assert align(current, target, num_gpus=2, permute_gpus=False).tolist() == [[0, 4, 3, 2, 1, 5]]
    assert align(current, target, num_gpus=2).tolist() == [[5, 1, 2, 3, 4, 0]]


def test_align_matches_empty_slots_and_duplicates():
    current = torch.tensor([[0, 0, -1, 1, 2, 3]])
    target = torch.tensor([[1, -1, 2, 0, 3, 0]])
    out = align(current, target, num_gpus=2)
    assert out.tolist() == [[0, 0, 3, 1, 2, -1]]


def test_align_keeps_the_most_slots_any_gpu_permutation_can():
    # Duplicates and several empty slots per GPU: the overlap counts min(copies) per expert.
    current = torch.tensor([[0, 0, -1, -1, 1, 2, 2, -1, 3, 3, 3, 1]])
    target = torch.tensor([[3, 3, 1, -1, -1, 0, 2, 2, 2, 0, -1, -1]])
    best = max(
        int((align(current, target[:, torch.cat([torch.arange(g * 4, g * 4 + 4) for g in order])], 3,
                   permute_gpus=False) == current).sum())
        for order in itertools.permutations(range(3))
    )
    assert int((align(current, target, 3) == current).sum()) == best


# Cost -----------------------------------------------------------------------------------------


def test_migration_cost_counts_changed_slots_and_bytes():
    current = Placement(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), num_experts=4, num_gpus=2)
    new = Placement(torch.tensor([[0, 2, 1, 3], [0, 1, 2, 3]]), num_experts=4, num_gpus=2)
    cost = migration_cost(current, new, bytes_per_expert=44_040_192)
    assert cost.moves.tolist() == [2, 0]
    assert cost.total_moves == 2
    assert cost.changed.nonzero().tolist() == [[0, 1], [0, 2]]
    assert cost.bytes == 2 * 44_040_192
    assert migration_cost(current, new).bytes is None


def test_emptied_slot_is_a_move_without_bytes():
    current = Placement(torch.tensor([[0, 1, 2, 0]]), num_experts=3, num_gpus=2)
    new = Placement(torch.tensor([[0, 1, 2, -1]]), num_experts=3, num_gpus=2)
    cost = migration_cost(current, new, bytes_per_expert=10)
    assert (cost.total_moves, cost.bytes) == (1, 0)


# Errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (dict(num_gpus=2, num_slots=24), "num_gpus"),
        (dict(num_slots=32), "num_slots"),
        (dict(num_nodes=2), "num_nodes"),
    ],
)
def test_current_must_match_the_cluster(override, needle, make_load):
    current, load, spec = case(SHAPES[0], 0, make_load)
    with pytest.raises(EplbError, match=needle):
        eplb.plan(load, **{**spec, **override}, current=current)


def test_current_must_match_the_load(make_load):
    current, load, spec = case(SHAPES[0], 0, make_load)
    with pytest.raises(EplbError, match="num_layers"):
        eplb.plan(load[:3], **spec, current=current)
    with pytest.raises(EplbError, match="num_experts"):
        eplb.plan(make_load(5, 18), **spec, current=current)
    with pytest.raises(EplbError, match="must be a Placement"):
        eplb.plan(load, **spec, current=current.phy2log)


@pytest.mark.parametrize("budget", [-1, 2.5, True, "4"])
def test_max_moves_must_be_a_count(budget, make_load):
    current, load, spec = case(SHAPES[0], 0, make_load)
    with pytest.raises(EplbError, match="max_moves"):
        eplb.plan(load, **spec, current=current, max_moves=budget)


def test_max_moves_needs_current(make_load):
    with pytest.raises(EplbError, match="current="):
        eplb.plan(make_load(2, 16), num_gpus=4, num_slots=24, max_moves=3)


def test_migration_cost_rejects_mismatch_and_bad_size():
    a = Placement(torch.tensor([[0, 1, 2, 3]]), num_experts=4, num_gpus=2)
    b = Placement(torch.tensor([[0, 1, 2, 3]]), num_experts=4, num_gpus=4)
    with pytest.raises(EplbError, match="num_gpus"):
        migration_cost(a, b)
    with pytest.raises(EplbError, match="bytes_per_expert"):
        migration_cost(a, a, bytes_per_expert=0)


# Real data --------------------------------------------------------------------------------------


def test_real_load_shift_is_mostly_fixed_by_few_moves(real_data):
    folder = real_data / "sglang-dsv3-ep-stats"
    if not folder.is_dir():
        pytest.skip("sglang-dsv3-ep-stats not found")
    read = lambda name: torch.tensor(json.loads((folder / name).read_text())["logical_count"])[3:]  # noqa: E731
    old, new = read("prefill_in512.json"), read("prefill_in4096.json")
    spec = dict(num_gpus=32, num_slots=288, algorithm="deepseek")
    current = eplb.plan(old, **spec)
    score = lambda p: eplb.evaluate(p, new).summary()["max_over_mean"]  # noqa: E731
    budgeted = eplb.plan(new, **spec, current=current, max_moves=8)
    assert (migration_cost(current, budgeted).moves <= 8).all()
    ideal_gain = score(current) - score(eplb.plan(new, **spec))
    # Eight moves of 288 slots buy more than half of what a full replan buys.
    assert score(current) - score(budgeted) > 0.5 * ideal_gain


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_candidates_score_every_move_as_applying_it_does(shape, make_load):
    # The greedy scores its candidates from deltas, and the sums of squares only for the layers that ask;
    # both must be what applying the move gives, and a layer's sums must not depend on which others ask.
    from eplb.planning.migration.budget import _candidates, _State, _with_empty_id

    current, load, spec = case(shape, 7, make_load)
    num_experts, num_gpus = current.num_experts, spec["num_gpus"]
    weight = torch.cat([load, load.new_zeros(load.shape[0], 1)], dim=1)
    row = _with_empty_id(current.phy2log, num_experts)
    origin = row.clone()
    origin[:, :3] = num_experts  # some slots already changed, so some moves are free
    state = _State.of(row, weight, num_gpus)
    moves = _candidates(state, origin, [torch.empty(0, dtype=torch.float64)])
    squares = moves.squares(torch.arange(row.shape[0]))
    assert torch.equal(moves.squares(torch.tensor([3, 1])), squares[[3, 1]])
    num_candidates = moves.cost.shape[1]
    layers = torch.arange(row.shape[0]).repeat_interleave(num_candidates)
    slot_a, value_a, slot_b, value_b = moves.decode(layers, torch.arange(num_candidates).repeat(row.shape[0]))
    checked = 0
    for i, layer in enumerate(layers.tolist()):
        if not bool(moves.valid.flatten()[i]):
            continue
        moved = row[layer].clone()
        moved[slot_a[i]], moved[slot_b[i]] = value_a[i], value_b[i]
        count = torch.zeros(num_experts + 1, dtype=torch.float64).scatter_add_(0, moved, torch.ones(moved.shape[0],
                                                                                                 dtype=torch.float64))
        gpu = (weight[layer] / count.clamp(min=1))[moved].view(num_gpus, -1).sum(1)
        cost = int((moved != origin[layer]).sum() - (row[layer] != origin[layer]).sum())
        assert int(moves.cost.flatten()[i]) == cost
        assert float(moves.new_max.flatten()[i]) == pytest.approx(float(gpu.max()), rel=1e-9)
        assert float(squares.flatten()[i]) == pytest.approx(float((gpu**2).sum()), rel=1e-9)
        checked += 1
    assert checked > 10
