"""``ExpertLoadRecorder``: per-step expert loads recorded on the GPU, CUDA-graph safe.

Shapes: L layers, P physical slots, W window steps, E logical experts, T recorded steps.

Every tensor the hot path touches is allocated once and only updated in place, and the
on/off flag and the step index live on the device; so ``record_topk``, ``record_counts``,
``record_coactivation`` and ``step`` can be captured in a CUDA graph, and ``start()`` /
``stop()`` / ``reset()`` take effect on later replays without re-capturing. Nothing on the hot
path syncs with the host; the readers (``loads()`` and friends) do, once.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from eplb.cluster import require_count
from eplb.errors import EplbError
from eplb.placement import Placement
from eplb.runtime.backend import use_triton
from eplb.runtime.recorder import collective
from eplb.runtime.recorder.convert import ring_order, to_logical, windowed_balancedness

Phy2Log = torch.Tensor | Placement


class ExpertLoadRecorder:
    """Token counts per layer and physical slot, one row per forward step, in a device ring.

    Use: call ``record_topk`` (or ``record_counts``) in every MoE layer and ``step()`` once at
    the end of every forward pass, on every rank. Read ``loads()`` (this rank) or
    ``global_loads()`` (summed over the EP group; a collective) and turn them into logical
    loads for ``eplb.plan`` with ``logical_loads(phy2log)``. After the placement changes, the
    old rows count slots of the old placement: convert them first, or ``reset()``.

    CUDA graphs: run the forward pass once eagerly before capturing it (Triton compiles each
    kernel on first use, which cannot happen inside a capture), then ``reset()``. A replay then
    records into the same buffers and closes its step on the device; the step index, not the
    host, picks the ring row, so replays need no host bookkeeping.

    Args:
        num_layers: ``L``, MoE layers recorded (use the model's layer count, dense layers
            included, for dumps SGLang reads).
        num_slots: ``P``, physical expert slots over the whole EP group.
        window: ``W``, steps kept; the oldest is overwritten first.
        device: where the buffers live; default the current CUDA device, else the CPU.
        decay: keep ``decayed = decay * decayed + step`` per slot (TensorRT-LLM uses 0.95),
            in ``(0, 1]``; None keeps none.
        num_experts: ``E``, needed with ``coactivation``.
        coactivation: keep per-layer co-activation counts ``[L, E, E]`` (opt-in: ``E^2`` counters
            per layer and ``K^2`` updates per token).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``: the rule of ``eplb.runtime.backend``
            (Triton on CUDA when it imports; the interpreter on CPU under ``TRITON_INTERPRET=1``).
        enabled: whether recording starts switched on.

    Attributes (fixed addresses; read them directly, mind they change under replay):
        current: ``[L, P]`` int32, the step being recorded.
        ring: ``[W, L, P]`` int32, closed steps; step ``s`` in row ``s % W``.
        steps: 0-d int64, steps closed so far.
        enabled_flag: 0-d int32, 1 while recording.
        decayed: ``[L, P]`` float32 or None.
        coactivation: ``[L, E, E]`` int32 or None; ``[l, i, j]`` counts tokens whose top-k held
            both ``i`` and ``j`` (the diagonal: tokens routed to ``i``), summed over all steps.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        window: int,
        device: str | torch.device | None = None,
        decay: float | None = None,
        *,
        num_experts: int | None = None,
        coactivation: bool = False,
        backend: str = "auto",
        enabled: bool = True,
    ) -> None:
        require_count("num_layers", num_layers, fix="pass the model's MoE layer count")
        require_count("num_slots", num_slots, fix="pass the physical expert slots over the EP group")
        require_count("window", window, fix="pass how many steps to keep")
        if decay is not None and not 0.0 < decay <= 1.0:
            raise EplbError(f"decay must be in (0, 1] (TensorRT-LLM uses 0.95), got {decay}; or pass None")
        if coactivation and (not isinstance(num_experts, int) or num_experts < 1):
            raise EplbError(f"coactivation needs the logical expert count; pass num_experts >= 1, got {num_experts!r}")
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda" and device.index is None:
            # Tensors report their device with an index; keep one so the device checks compare equal.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.num_layers, self.num_slots, self.window = num_layers, num_slots, window
        self.num_experts = num_experts
        self.decay = decay
        self.backend = "triton" if use_triton(backend, self.device) else "torch"
        self._ops = importlib.import_module(f"eplb.runtime.recorder._{self.backend}")

        def zeros(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device)

        self.current = zeros(num_layers, num_slots)
        self.ring = zeros(window, num_layers, num_slots)
        self.steps = zeros(dtype=torch.int64)
        self.enabled_flag = torch.full((), int(enabled), dtype=torch.int32, device=self.device)
        self.decayed = zeros(num_layers, num_slots, dtype=torch.float32) if decay is not None else None
        self.coactivation = zeros(num_layers, num_experts, num_experts) if coactivation else None

    # Control (outside the graph; device writes, no sync) --------------------------------

    def start(self) -> None:
        """Switch recording on (takes effect on the device, for eager calls and graph replays)."""
        self.enabled_flag.fill_(1)

    def stop(self) -> None:
        """Switch recording off: records and ``step()`` become no-ops until ``start()``."""
        self.enabled_flag.fill_(0)

    def reset(self) -> None:
        """Forget everything recorded (e.g. after the placement changed); addresses stay."""
        for t in (self.current, self.ring, self.steps, self.decayed, self.coactivation):
            if t is not None:
                t.zero_()

    # Hot path (graph-capturable) -------------------------------------------------------

    def record_topk(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count the routed physical slot ids of one layer.

        Args:
            layer: the layer index in ``[0, L)``.
            topk_ids: ``[M, K]`` (any shape) physical slot ids on the recorder's device, any
                integer dtype. Ids outside ``[0, P)`` are skipped: ``-1`` marks padding (checking
                for other bad ids would need a host sync).
        """
        self._check_layer(layer)
        ids = self._check_ids(topk_ids, "topk_ids")
        self._ops.record_topk(self.current[layer], ids.reshape(-1), self.enabled_flag)

    def record_counts(self, layer: int, counts: torch.Tensor | Sequence[int], first_slot: int = 0) -> None:
        """Add per-slot token counts the dispatcher already has, into slots ``[first_slot, first_slot + n)``.

        Args:
            layer: the layer index in ``[0, L)``.
            counts: ``[n]`` tokens received by each local slot (DeepEP's
                ``num_recv_tokens_per_expert``, DeepEP low-latency's ``masked_m``, vLLM's
                ``expert_num_tokens``), any integer dtype, on the recorder's device. A Python
                list (DeepEP normal mode) is copied to the device first, which a graph cannot hold.
            first_slot: the global id of this rank's first slot, ``rank * P / G``.
        """
        self._check_layer(layer)
        if not isinstance(counts, torch.Tensor):
            counts = torch.as_tensor(counts, dtype=torch.int32).to(self.device)
        counts = self._check_ids(counts, "counts").reshape(-1)
        n = counts.numel()
        if not 0 <= first_slot <= self.num_slots - n:
            raise EplbError(
                f"slots [{first_slot}, {first_slot + n}) fall outside [0, {self.num_slots}); pass first_slot = "
                f"rank * slots_per_gpu and this rank's counts only"
            )
        if n:
            self._ops.record_counts(self.current[layer, first_slot : first_slot + n], counts, self.enabled_flag)

    def record_coactivation(self, layer: int, topk_ids: torch.Tensor, phy2log: Phy2Log | None = None) -> None:
        """Count, for each pair of logical experts, the tokens that picked both (opt-in).

        Args:
            layer: the layer index in ``[0, L)``.
            topk_ids: ``[M, K]`` ids on the recorder's device: logical expert ids, or physical slot
                ids when ``phy2log`` is given. Ids out of range (``-1`` padding) are skipped.
            phy2log: ``[L, P]`` int64 on the recorder's device to map slots to experts (graph-safe),
                or a ``Placement`` / CPU tensor, copied to the device first (not graph-safe).
        """
        if self.coactivation is None:
            raise EplbError(
                "this recorder keeps no co-activation counts; build it with coactivation=True, num_experts=E"
            )
        self._check_layer(layer)
        ids = self._check_ids(topk_ids, "topk_ids")
        if ids.ndim != 2:
            raise EplbError(f"topk_ids has shape {tuple(ids.shape)}; pass [tokens, top_k]")
        ids = ids.to(torch.int64)
        if phy2log is not None:
            slot_expert = self._phy2log_on_device(phy2log)[layer]
            held = (ids >= 0) & (ids < self.num_slots)
            ids = torch.where(held, slot_expert[ids.clamp(0, self.num_slots - 1)], -1)
        num_experts = self.num_experts
        valid = (ids >= 0) & (ids < num_experts)
        pair = ids[:, :, None] * num_experts + ids[:, None, :]
        counted = (valid[:, :, None] & valid[:, None, :] & (self.enabled_flag != 0)).reshape(-1)
        self.coactivation[layer].view(-1).scatter_add_(
            0, torch.where(counted, pair.reshape(-1), 0), counted.to(torch.int32)
        )

    def step(self) -> None:
        """Close the current forward step: it becomes the newest window row (a no-op while stopped)."""
        self._ops.close_step(self.current, self.ring, self.steps, self.enabled_flag, self.decayed, self.decay or 1.0)

    # Readers (one host sync each) ------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Steps closed so far (may exceed the window)."""
        return int(self.steps)

    @property
    def enabled(self) -> bool:
        return bool(self.enabled_flag)

    def loads(self) -> torch.Tensor:
        """``[T, L, P]`` int32 slot loads of this rank, oldest step first, ``T = min(steps, W)``."""
        return self.ring.index_select(0, ring_order(self.num_steps, self.window, self.device))

    def logical_loads(self, phy2log: Phy2Log, loads: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, L, E]`` logical loads: ``loads`` (default :meth:`loads`) summed over each expert's replicas.

        Args:
            phy2log: ``[L, P]`` (``-1``: empty slot) or a ``Placement``: the placement live while
                recording.
            loads: ``[..., L, P]`` slot loads, e.g. from :meth:`global_loads`.
        """
        return to_logical(self.loads() if loads is None else loads, phy2log, self.num_experts)

    def decayed_loads(self) -> torch.Tensor:
        """``[L, P]`` float32 decayed slot loads (a copy)."""
        if self.decayed is None:
            raise EplbError("this recorder keeps no decayed loads; build it with decay=0.95 (or another factor)")
        return self.decayed.clone()

    def global_ring(self, group: Any | None = None) -> torch.Tensor:
        """``[W, L, P]`` the ring summed over ``group``, in ring order (pair it with ``steps``).

        A collective every rank must call; no host sync with NCCL, so it may run on the hot path
        (e.g. every 100 steps) to feed :meth:`balancedness`. Assumes every rank stepped in lockstep.
        """
        return collective.global_sum(self.ring, group)

    def global_loads(self, group: Any | None = None) -> torch.Tensor:
        """``[T, L, P]`` slot loads summed over ``group`` (default: the world), oldest step first.

        A collective every rank must call (two all-reduces, one host sync); raises EplbError if
        the ranks closed different numbers of steps.
        """
        steps = collective.check_same_steps(self.steps, group)
        return self.global_ring(group).index_select(0, ring_order(steps, self.window, self.device))

    def balancedness(
        self, slots_per_gpu: int, sizes: Iterable[int] | None = None, ring: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Per-layer mean/max GPU load averaged over the last ``s`` steps: ``{s: [L] float32}`` on the device.

        No host sync. Sizes default to those of 10 / 100 / 1000 the window holds. Pass
        ``ring=global_ring(group)`` for the EP group's balance: this rank's own ring counts only
        its own tokens (``record_topk``) or its own slots (``record_counts``).
        """
        return windowed_balancedness(self.ring if ring is None else ring, self.steps, slots_per_gpu, sizes)

    def dump(
        self,
        path: str | os.PathLike,
        *,
        fmt: str = "eplb",
        phy2log: Phy2Log | None = None,
        loads: torch.Tensor | None = None,
        rank: int = 0,
    ) -> None:
        """Write the window to ``path`` atomically (see ``eplb.io.dumps`` for both formats).

        Args:
            path: destination file (``.pt``).
            fmt: ``"eplb"`` (slot loads, placement, logical loads, decayed loads, sizes) or
                ``"sglang"`` (SGLang's ``logical_count`` dump; needs ``phy2log``).
            phy2log: the placement live while recording; needed for logical loads.
            loads: ``[T, L, P]`` to write instead of this rank's :meth:`loads`, e.g.
                :meth:`global_loads` (SGLang's dumps hold the group's sum; write it from one rank).
            rank: the writer's rank, stored in the dump.
        """
        from eplb.io import dumps  # the file formats live in eplb.io; a recorder that never dumps never loads them

        loads = self.loads() if loads is None else loads
        logical = None if phy2log is None else self.logical_loads(phy2log, loads)
        if fmt == "sglang":
            if logical is None:
                raise EplbError("SGLang dumps hold logical loads; pass phy2log (the placement live while recording)")
            dumps.save_sglang(path, logical, rank=rank)
        elif fmt == "eplb":
            meta = {"num_layers": self.num_layers, "num_slots": self.num_slots, "window": self.window,
                    "steps": self.num_steps, "decay": self.decay, "rank": rank}
            p2l = phy2log.phy2log if isinstance(phy2log, Placement) else phy2log
            dumps.save_eplb(path, loads, phy2log=p2l, logical_count=logical, decayed=self.decayed, meta=meta)
        else:
            raise EplbError(f"unknown dump format {fmt!r}; pass fmt='eplb' or fmt='sglang'")

    # Checks (metadata only: no sync) ----------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise EplbError(
                f"layer {layer} is outside [0, {self.num_layers}); pass a layer index the recorder was built for"
            )

    def _check_ids(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise EplbError(f"{what} has dtype {ids.dtype}; pass integer ids or counts")
        if ids.device != self.device:
            raise EplbError(f"{what} is on {ids.device} but the recorder is on {self.device}; move it there first")
        return ids

    def _phy2log_on_device(self, phy2log: Phy2Log) -> torch.Tensor:
        table = phy2log.phy2log if isinstance(phy2log, Placement) else torch.as_tensor(phy2log)
        if tuple(table.shape) != (self.num_layers, self.num_slots):
            raise EplbError(
                f"phy2log has shape {tuple(table.shape)}; pass the [{self.num_layers}, {self.num_slots}] placement"
            )
        return table.to(self.device, torch.int64)

    def __repr__(self) -> str:
        return (
            f"ExpertLoadRecorder(layers={self.num_layers}, slots={self.num_slots}, window={self.window}, "
            f"device={self.device}, backend={self.backend!r}, decay={self.decay})"
        )

