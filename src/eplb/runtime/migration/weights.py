"""``ExpertWeights``: the engine's own per-slot expert tensors, registered once and written in place.

A serving engine keeps, per MoE layer on each rank, tensors whose leading dimension is the local
slot (``S = P / G``): ``w13 [S, 2I, H]``, ``w2 [S, H, I]``, fp8/int8 weights with their block
scales, biases. Migration reads and writes them as raw bytes, one row per slot, so every dtype
moves bit for bit; nothing is copied at registration and no tensor is ever replaced, so the
addresses that CUDA graphs captured stay valid.

One slot's bytes travel and are staged as one *row* (``RowLayout``): every tensor's slot row at a
16-byte aligned offset, then one int64 checksum per tensor, so a message of ``k`` experts is ``k``
contiguous rows and a receiver checks each row against the checksums its sender wrote into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from eplb.errors import EplbError

# Row segments start on this boundary so device copies of a segment stay aligned.
ALIGN = 16
CHECKSUM_BYTES = 8


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Segment:
    """One tensor's place in a staged row: bytes ``[offset, offset + nbytes)``."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RowLayout:
    """How one slot of one layer is laid out in a staged or sent row.

    Attributes:
        segments: one per tensor, in registration order.
        checksum_offset: where the ``len(segments)`` int64 checksums start (8-byte aligned).
        row_bytes: the row's width, a multiple of 16.
        payload_bytes: the slot's weight bytes (what ``migration_cost`` calls bytes per expert).
    """

    segments: tuple[Segment, ...]
    checksum_offset: int
    row_bytes: int
    payload_bytes: int

    @classmethod
    def of(cls, sizes: Sequence[tuple[str, int]]) -> RowLayout:
        segments, offset = [], 0
        for name, nbytes in sizes:
            segments.append(Segment(name, offset, nbytes))
            offset = _align(offset + nbytes)
        row_bytes = _align(offset + CHECKSUM_BYTES * len(segments))
        return cls(tuple(segments), offset, row_bytes, sum(n for _, n in sizes))


class ExpertWeights:
    """The expert tensors of every MoE layer on this rank, keyed by name.

    Args:
        layers: one mapping per MoE layer, indexed like the placement's layer rows (row ``l``
            of ``phy2log`` is ``layers[l]``), from a tensor name to the engine's tensor with the
            local slot as its leading dimension ``[S, ...]``. Any number of tensors, any dtypes
            (bf16, fp8 with float32 block scales, int8, biases), possibly different per layer.
            Every slot row ``t[s]`` must be contiguous (the slot stride itself may be anything,
            e.g. a slice of a larger buffer); ``S`` and the device must agree across tensors
            and layers.

    The tensors are kept, not copied: migration writes their slot rows in place.
    """

    def __init__(self, layers: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if isinstance(layers, Mapping) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise EplbError(
                "ExpertWeights takes a non-empty list with one {name: tensor} dict per MoE layer, "
                f"got {type(layers).__name__}; pass e.g. [{{'w13': w13_l0, 'w2': w2_l0}}, ...]"
            )
        self._tensors: list[dict[str, torch.Tensor]] = []
        self._rows: list[list[torch.Tensor]] = []
        self._layouts: list[RowLayout] = []
        self.num_slots: int | None = None
        self.device: torch.device | None = None
        for layer, named in enumerate(layers):
            if not isinstance(named, Mapping) or len(named) == 0:
                raise EplbError(f"layer {layer} of ExpertWeights is not a non-empty {{name: tensor}} dict; pass one")
            rows = [self._byte_rows(layer, str(name), tensor) for name, tensor in named.items()]
            self._tensors.append(dict(named))
            self._rows.append(rows)
            self._layouts.append(RowLayout.of([(str(n), r.shape[1]) for n, r in zip(named, rows, strict=True)]))

    def _byte_rows(self, layer: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``[S, n]`` uint8 view of ``tensor``'s slot rows (shares its memory)."""
        where = f"tensor {name!r} of layer {layer}"
        if not isinstance(tensor, torch.Tensor):
            raise EplbError(f"{where} is a {type(tensor).__name__}, not a torch.Tensor; register the engine's tensor")
        if tensor.ndim == 0 or tensor.numel() == 0:
            raise EplbError(f"{where} has shape {tuple(tensor.shape)}; pass a non-empty tensor with a leading slot dim")
        if self.num_slots is None:
            self.num_slots, self.device = tensor.shape[0], tensor.device
        if tensor.shape[0] != self.num_slots:
            raise EplbError(
                f"{where} has {tensor.shape[0]} slots but other tensors have {self.num_slots}; every tensor's "
                "leading dimension must be the rank's local slot count P / G"
            )
        if tensor.device != self.device:
            raise EplbError(f"{where} is on {tensor.device} but other tensors are on {self.device}; keep them on one")
        try:
            return tensor.view(tensor.shape[0], -1).view(torch.uint8)
        except RuntimeError:
            raise EplbError(
                f"{where} has slot rows that are not contiguous (shape {tuple(tensor.shape)}, strides "
                f"{tensor.stride()}); register a tensor whose rows t[s] are contiguous, e.g. make it contiguous "
                "before the engine captures it"
            ) from None

    @property
    def num_layers(self) -> int:
        return len(self._tensors)

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """The registered tensors of ``layer`` (the engine's own objects)."""
        return dict(self._tensors[layer])

    def byte_rows(self, layer: int) -> list[torch.Tensor]:
        """``[S, n_t]`` uint8 views of each tensor of ``layer``, in registration order."""
        return self._rows[layer]

    def layout(self, layer: int) -> RowLayout:
        """How a slot of ``layer`` is laid out in a staged row."""
        return self._layouts[layer]

    def bytes_per_slot(self, layer: int) -> int:
        """Weight bytes of one slot of ``layer`` over all its tensors."""
        return self._layouts[layer].payload_bytes

    def check_placement(self, num_layers: int, slots_per_gpu: int) -> None:
        """Raise EplbError unless these weights fit a placement of this many layers and local slots."""
        if self.num_layers != num_layers or self.num_slots != slots_per_gpu:
            raise EplbError(
                f"the weights have {self.num_layers} layers x {self.num_slots} local slots but the placement has "
                f"{num_layers} layers x {slots_per_gpu} slots per GPU; register one dict per placement layer row "
                "with P / G slots each"
            )

    def __repr__(self) -> str:
        names = sorted({n for layer in self._tensors for n in layer})
        return f"ExpertWeights(layers={self.num_layers}, slots={self.num_slots}, device={self.device}, tensors={names})"
