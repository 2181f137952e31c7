"""The online loop: record -> decide -> migrate -> switch dispatch, one ``step()`` per forward pass.

Every ``every`` steps the ``Rebalancer`` folds the recorder's new rows into a logical load history
(each row converted with the placement that was serving when it was recorded), and rank 0 asks
``eplb.planning.online.decide`` on a CPU thread whether a placement within ``max_moves`` pays
``min_gain``. ``plan_lag`` steps later every rank receives the decision (one broadcast) and,
if it acts, the weights move:

- ``mode="async"``: ``layers_per_step`` migration steps (a layer each, or a part of one under
  ``staging_bytes``) at a time. Their transfers run on a background thread over the rebalancer's own
  process group (so they never interleave with the engine's collectives), on a side CUDA stream, while
  the engine serves; at the first ``step()`` by which every rank has staged them (usually the next), every
  rank votes and commits them together, at the step boundary, then ``on_commit`` switches each layer's
  dispatch tables before the next forward pass. ``step()`` never waits for staging to finish.
- ``mode="sync"``: everything moves inside the deciding ``step()`` (offline use, tests).

A failed migration step leaves the old weights and placement serving everywhere (see
``eplb.runtime.migration``); the rebalancer logs it, drops that rebalance and decides afresh later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from eplb.cluster import require_choice, require_count
from eplb.errors import EplbError
from eplb.placement import Placement, check_same_shape
from eplb.planning.online import Decision, OnlineConfig, current_workload, decide, predicted_max_over_mean
from eplb.runtime.migration import ExpertWeights, MigrationConfig, MigrationError, MigrationReport, Session, Step
from eplb.runtime.migration import migrate as migrate_all
from eplb.runtime.migration.plan import plan_parts
from eplb.runtime.migration.transfer import warm_up
from eplb.runtime.recorder import ExpertLoadRecorder, to_logical

log = logging.getLogger("eplb.rebalancer")

MODES = ("async", "sync")


@dataclass(frozen=True)
class RebalancerConfig:
    """The knobs of the online loop; the same on every rank.

    Args:
        every: steps between decisions (and the steps each history window sums).
        mode: ``"async"`` (serving goes on while weights move, ``layers_per_step`` layers committed per
            ``step()``) or ``"sync"`` (all layers move inside the deciding step).
        plan_lag: async: steps rank 0's planning thread gets before every rank needs its decision
            (``step()`` waits for it only if planning takes longer than that).
        layers_per_step: async: layers staged during one forward pass and committed at the next step
            boundary by which every rank has staged them (staging memory grows with it; see
            ``MigrationConfig.staging_bytes``). One layer per step takes as many steps as layers change to
            land a rebalance: raise it where the copies hide under the step's compute
            (``docs/benchmarks/simulate.md`` has the trade-off).
        history: windows kept (each one ``every`` steps); the policy plans from the last ``policy.window``.
        policy: how to decide (window, ``max_moves``, ``min_gain``, algorithm, router groups).
        migration: how to move the weights (staging bound, peers per round, timeout, checksums).
    """

    every: int = 1000
    mode: str = "async"
    plan_lag: int = 8
    layers_per_step: int = 1
    history: int = 32
    policy: OnlineConfig = field(default_factory=OnlineConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)

    def __post_init__(self) -> None:
        require_count("every", self.every, fix="pass the steps between rebalancing decisions, e.g. 1000")
        require_choice("mode", self.mode, MODES)
        require_count("plan_lag", self.plan_lag, fix="pass the steps planning may take, e.g. 8")
        if self.plan_lag >= self.every:
            raise EplbError(f"plan_lag ({self.plan_lag}) must be below every ({self.every}); a decision must land "
                            "before the next one starts")
        require_count("history", self.history, fix="pass how many windows to keep, e.g. 32")
        require_count("layers_per_step", self.layers_per_step, fix="pass the layers committed per step, e.g. 1")


@dataclass
class RebalanceRecord:
    """One decision and what became of it (``Rebalancer.last``)."""

    step: int
    decision: Decision
    report: MigrationReport = field(default_factory=MigrationReport)
    realised: float | None = None  # max/mean of the new placement on the next window, once recorded
    error: str | None = None
    done: bool = False


class Rebalancer:
    """Closes the loop at serving time: recorded loads -> new placement -> moved weights -> new dispatch.

    Args:
        recorder: the ``ExpertLoadRecorder`` the MoE layers record physical top-k into (global slot ids,
            one row per placement layer); its window should hold ``every`` steps.
        placement: the placement serving now (what ``weights`` hold).
        weights: this rank's ``ExpertWeights`` (the engine's own tensors, moved in place).
        group: the expert-parallel group the recorder sums over (None: the world). Rank g of it is GPU g.
        config: see ``RebalancerConfig``.
        on_commit: ``on_commit(layer, placement)`` after a layer's (or part's) weights were committed on
            every rank, with the placement now serving: switch that layer's dispatch (and waterfill)
            tables here, before the next forward pass.

    Every rank of the world must build it (a collective: it creates the rebalancer's own process group),
    and every rank of ``group`` calls ``step()`` once after every forward pass, after ``recorder.step()``
    (rows recorded from then on count slots of the layers ``step()`` commits).
    """

    def __init__(
        self,
        recorder: ExpertLoadRecorder,
        placement: Placement,
        weights: ExpertWeights,
        group: Any = None,
        *,
        config: RebalancerConfig | None = None,
        on_commit: Callable[[int, Placement], None] | None = None,
    ) -> None:
        self.config = config or RebalancerConfig()
        if recorder.num_layers != placement.num_layers or recorder.num_slots != placement.num_slots:
            raise EplbError(
                f"the recorder has {recorder.num_layers} layers x {recorder.num_slots} slots but the placement "
                f"{placement.num_layers} x {placement.num_slots}; record the layers and slots the placement covers"
            )
        weights.check_placement(placement.num_layers, placement.slots_per_gpu)
        self.recorder, self.weights, self.group, self.on_commit = recorder, weights, group, on_commit
        self.serving = placement
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        # Migration runs on a thread of its own in async mode: its P2P ops get their own communicator.
        ranks = dist.get_process_group_ranks(group) if self.distributed and group is not None else None
        self._migration_group = dist.new_group(ranks) if self.distributed else None
        self._stream = torch.cuda.Stream(recorder.device) if recorder.device.type == "cuda" else None
        self.history = torch.zeros(0, placement.num_layers, placement.num_experts, dtype=torch.float64)
        self.steps = 0
        self.last: RebalanceRecord | None = None  # the last decision, acted on or not
        self.rebalances: list[RebalanceRecord] = []  # the decisions acted on, oldest first (the last 100)
        self._read_upto = recorder.num_steps  # recorder steps already folded into the history
        # (recorder steps closed when the row started serving, phy2log): an int, or the recorder's device
        # counter copied at a commit (reading it there would make the host wait for the queued forward passes).
        self._snapshots: list[tuple[Any, torch.Tensor]] = [(self._read_upto, placement.phy2log.clone())]
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-plan")
        self._mover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-move")
        self._plan: tuple[int, Future | None] | None = None  # (step it is due, rank 0's future)
        self._queue: list[tuple[int, Any]] = []  # async: (part index, LayerTransfers) still to move
        self._session: Session | None = None
        self._pending: list[tuple[Step, Future]] = []
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay a migration's first-use costs here, at start-up, not in the serving steps of the first
        rebalance: the two threads, the rebalancer group's communicator, the staging and checksum kernels, and
        the staging memory of ``layers_per_step`` layers (reserved now, so an engine that sizes its caches
        after start-up leaves room for it)."""
        self._planner.submit(int).result()
        if self.distributed:
            dist.all_reduce(torch.zeros(1, device=self.recorder.device), group=self._migration_group)
        staging = self.config.migration.staging_bytes
        row_bytes = max(self.weights.layout(layer).row_bytes for layer in range(self.weights.num_layers))
        rows = self.serving.slots_per_gpu if staging is None else min(self.serving.slots_per_gpu, staging // row_bytes)
        self._mover.submit(self._device_call, warm_up, self.weights, self.config.layers_per_step * max(rows, 1),
                           self.config.migration.verify, self.config.migration.backend, self._stream).result()

    # The loop ------------------------------------------------------------------------------

    def step(self) -> None:
        """Advance one forward pass: commit the migration steps staged on the mover thread once every rank has
        staged them, start the next ones, and decide every ``every`` steps. Every rank calls it at the same
        point of every step."""
        self.steps += 1
        released = None
        if self._pending and self._staged_everywhere():
            self._finish_pending()
            released = self._released()
        if self._plan is not None and self.steps >= self._plan[0]:
            self._land_decision()
        if self._queue and not self._pending:
            self._start_next(released)
        if self.steps % self.config.every == 0 and self._plan is None and not self.migrating:
            self._start_decision()

    def move_to(self, placement: Placement) -> None:
        """Start moving to ``placement`` now, as if the policy had chosen it (an operator's decision, or a
        plan made elsewhere): async, ``layers_per_step`` layers per ``step()``; sync, before this call returns.
        Every rank calls it at the same point of the same step, with the same placement."""
        if self.migrating or self._plan is not None:
            raise EplbError("a rebalance is under way; call move_to once `migrating` is False")
        check_same_shape(self.serving, placement)
        recent = current_workload(self.history, self.config.policy) if self.history.shape[0] else self.history
        score = predicted_max_over_mean if recent.shape[0] else (lambda *_: float("nan"))
        moves = (placement.phy2log != self.serving.phy2log).sum(1)
        self._act(Decision(placement=placement, act=bool(moves.any()), before=score(self.serving, recent),
                           after=score(placement, recent), moves=moves, plan_seconds=0.0))

    @property
    def migrating(self) -> bool:
        """Whether a rebalance is still moving weights."""
        return bool(self._queue) or bool(self._pending)

    def close(self) -> None:
        """Wait for the background threads (and drop a half-staged step: nothing of it was committed)."""
        self._planner.shutdown(wait=True)
        self._mover.shutdown(wait=True)

    # History -------------------------------------------------------------------------------

    def _fold_history(self) -> None:
        """Sum the rows recorded since the last fold into one logical window, each row converted with
        the placement that served it (layers commit at step boundaries, so rows of one window may differ)."""
        rows = self.recorder.global_loads(self.group) if self.distributed else self.recorder.loads()
        newest = self.recorder.num_steps
        first = max(self._read_upto, newest - rows.shape[0])
        window = torch.zeros(self.serving.num_layers, self.serving.num_experts, dtype=torch.float64)
        starts = [int(since) for since, _ in self._snapshots]
        for (_, phy2log), since, until in zip(self._snapshots, starts, [*starts[1:], newest], strict=True):
            lo, hi = max(since, first), min(until, newest)
            if hi > lo:
                part = rows[lo - newest + rows.shape[0] : hi - newest + rows.shape[0]].to(torch.float64)
                window += to_logical(part.sum(0), phy2log.to(part.device), self.serving.num_experts).cpu()
        self._read_upto = newest
        self._snapshots = [(newest, self.serving.phy2log.clone())]
        self.history = torch.cat([self.history, window[None]])[-self.config.history :]
        done = self.rebalances[-1] if self.rebalances else None
        if done is not None and done.done and done.realised is None and done.error is None:
            done.realised = predicted_max_over_mean(self.serving, window[None])

    # Deciding ------------------------------------------------------------------------------

    def _start_decision(self) -> None:
        self._fold_history()
        if not bool(self.history.sum() > 0):
            return
        history, serving = self.history.clone(), self.serving
        if self.config.mode == "sync":
            self._act(self._broadcast(decide(history, serving, self.config.policy) if self.rank == 0 else None))
            return
        future = self._planner.submit(decide, history, serving, self.config.policy) if self.rank == 0 else None
        self._plan = (self.steps + self.config.plan_lag, future)

    def _land_decision(self) -> None:
        assert self._plan is not None
        _, future = self._plan
        self._plan = None
        decision = future.result() if future is not None else None
        self._act(self._broadcast(decision))

    def _broadcast(self, decision: Decision | None) -> Decision:
        """Rank 0's decision on every rank (one object broadcast over the rebalancer's group)."""
        if not self.distributed:
            assert decision is not None
            return decision
        box = [decision]
        src = dist.get_global_rank(self._migration_group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self._migration_group)
        return box[0]

    def _act(self, decision: Decision) -> None:
        self.last = RebalanceRecord(step=self.steps, decision=decision, done=not decision.act)
        if not decision.act:
            log.debug("step %d: no rebalance (predicted max/mean %.4f -> %.4f, below min_gain)",
                      self.steps, decision.before, decision.after)
            return
        self.rebalances = [*self.rebalances[-99:], self.last]
        target = decision.placement
        if self.config.mode == "sync":
            try:
                report = migrate_all(self.weights, self.serving, target, self._migration_group,
                                     config=self.config.migration, on_commit=self._committed)
                self.last.report = report
            except MigrationError as exc:
                self._failed(exc)
            self._finish_rebalance()
            return
        layers = [int(layer) for layer in decision.order]  # the largest predicted gain lands first
        self._session = Session.open(self._migration_group, None, self.serving.num_gpus, background=True)
        for layer in layers:
            row_bytes = self.weights.layout(layer).row_bytes
            parts = plan_parts(self.serving, target, layer, row_bytes, self.config.migration.staging_bytes,
                               max_peers=self.config.migration.max_peers)
            self._queue.extend(enumerate(parts))

    # Moving (async) --------------------------------------------------------------------------

    def _start_next(self, released: Any = None) -> None:
        """Stage up to ``layers_per_step`` migration steps of distinct layers, in queue order, on the mover
        thread (a layer's later parts wait: each is planned on the row its earlier parts commit), once
        ``released`` (the event ``_released`` returned, or None) has passed."""
        assert self._session is not None
        layers: set[int] = set()
        while self._queue and len(layers) < self.config.layers_per_step and self._queue[0][1].layer not in layers:
            index, part = self._queue.pop(0)
            layers.add(part.layer)
            step = Step(self.weights, part, index, self._session, self.config.migration, self._stream)
            self._pending.append((step, self._mover.submit(self._device_call, step.prepare, after=released)))

    def _released(self) -> Any:
        """CUDA: an event on the serving stream after the commits that read the last staging rows, or None.

        The allocator gives those rows to the next staging only once the commits ran; staging that
        allocated before then would get fresh device memory (a ``cudaMalloc`` inside a serving step, and
        staging memory twice the bound), so the mover waits for this event first."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _device_call(self, fn: Callable[..., Any], *args: Any, after: Any = None) -> Any:
        # The CUDA device is per thread: work on this rank's device, not device 0.
        if self._stream is not None:
            torch.cuda.set_device(self.recorder.device)
        if after is not None:
            after.synchronize()
        return fn(*args)

    def _staged_everywhere(self) -> bool:
        """Whether every rank's pending staging is done, the same answer on every rank: then they vote and commit
        at this step boundary; if not, all of them keep serving and ask again at the next one, so that a
        step never waits for staging (whose kernels may queue behind the forward pass's)."""
        assert self._session is not None
        ready = all(future.done() for _, future in self._pending)
        if self._session.world == 1:
            return ready
        try:
            return self._session.all_ready(ready, self.config.migration.timeout_s)
        except TimeoutError:  # a rank is stuck or gone: the vote, with its own timeout, aborts everywhere
            return True

    def _finish_pending(self) -> None:
        """Vote on and commit every staged step, in order, on every rank; a failed one is not committed (the
        others are: they move other layers) and ends this rebalance."""
        assert self.last is not None
        pending, self._pending = self._pending, []
        # Done already unless a rank timed out agreeing; a failed job wrote its abort before this rank votes.
        prepared = [future.result() for _, future in pending]
        failure: MigrationError | None = None
        for (step, _), ready in zip(pending, prepared, strict=True):
            try:
                verdict = step.decide(ready)
                if verdict is None:
                    if self._stream is not None:
                        torch.cuda.current_stream().wait_stream(self._stream)
                    step.commit()
                    self.last.report.add_step(step.t, self.weights.layout(step.t.layer).payload_bytes)
            finally:
                step.finish()
                for phase, seconds in step.seconds.items():
                    self.last.report.seconds[phase] += seconds
            if verdict is None:
                self._committed(step.t.layer, step.t.new)
            elif failure is None:
                failure = MigrationError(step.t.layer, step.part, verdict.ranks, verdict.cause, self.serving,
                                         self.last.report)
        if failure is not None:
            self._failed(failure)
        if not self._queue:
            self._finish_rebalance()

    def _committed(self, layer: int, row: torch.Tensor) -> None:
        phy2log = self.serving.phy2log.clone()
        phy2log[layer] = row
        self.serving = Placement(phy2log, self.serving.num_experts, self.serving.num_gpus, self.serving.num_nodes,
                                 algorithm=self.serving.algorithm)
        # Rows recorded from the next step on count slots of the new row.
        self._snapshots.append((self.recorder.steps.clone(), phy2log.clone()))
        if self.on_commit is not None:
            self.on_commit(layer, self.serving)

    def _failed(self, exc: MigrationError) -> None:
        assert self.last is not None
        self._queue.clear()
        self.last.error = str(exc)
        log.warning("rank %d, step %d: rebalance stopped, the placement before it keeps serving: %s",
                    self.rank, self.steps, exc)

    def _finish_rebalance(self) -> None:
        assert self.last is not None
        self._session = None
        self.last.done = True
        d, r = self.last.decision, self.last.report
        if self.rank != 0:  # every rank knows the same numbers: one line per rebalance, not one per rank
            return
        log.info(
            "step %d: rebalanced %d slots over %d layers (predicted max/mean %.4f -> %.4f; planned in %.2fs; "
            "%.1f MB sent, %.1f MB within nodes)%s",
            self.steps, r.moves, len(set(r.layers_committed)) or int((d.moves > 0).sum()), d.before, d.after,
            d.plan_seconds, r.bytes_sent / 1e6, r.bytes_intra_node / 1e6,
            f"; stopped: {self.last.error}" if self.last.error else "",
        )

    # Restart ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a restarted server needs to resume: the placement serving and the load history."""
        return {"placement": self.serving.to_dict(), "history": self.history.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the weights must already hold ``state["placement"]``."""
        try:
            placement = Placement.from_dict(state["placement"])
            history = torch.as_tensor(state["history"], dtype=torch.float64)
            steps = int(state["steps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EplbError(
                f"rebalancer state is malformed ({exc}); pass what Rebalancer.state_dict() returned"
            ) from None
        if placement.phy2log.shape != self.serving.phy2log.shape or placement.num_experts != self.serving.num_experts:
            raise EplbError("the saved placement is for another model or cluster; resume with the state of this one")
        if self.migrating:
            raise EplbError("a rebalance is moving weights; load the state before serving starts")
        self.serving, self.history, self.steps = placement, history[-self.config.history :], steps
        self._snapshots = [(self.recorder.num_steps, placement.phy2log.clone())]
        self._read_upto = self.recorder.num_steps
