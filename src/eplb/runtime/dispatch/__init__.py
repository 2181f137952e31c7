"""Dispatch: route each token's logical experts to physical replicas.

- ``StaticDispatch(placement, rank)``: a fixed nearest replica per rank (same GPU, same node,
  then an even spread);
- ``HashDispatch(placement)``: a rank-invariant hash of the token's index over the replicas;
- ``WeightedDispatch(placement, probs)``: a hash-driven draw with per-replica probabilities
  (Walker's alias method: one bucket and one compare per entry), which ``solve_weights`` (or
  ``WeightedDispatch.from_load``) computes from recent loads so that GPU loads even out.

``remap(layer, topk_ids)`` runs a Triton kernel on CUDA and torch elsewhere; both are
CUDA-graph capturable. Triton is imported only when the kernel is used.
"""

from eplb.runtime.dispatch.policies import HashDispatch, StaticDispatch, WeightedDispatch, static_tables
from eplb.runtime.dispatch.solver import solve_weights, split_gpu_load

__all__ = ["HashDispatch", "StaticDispatch", "WeightedDispatch", "solve_weights", "split_gpu_load", "static_tables"]
