"""The runtime: what runs inside the serving engine, on the GPU hot path and in the online loop.

- ``recorder``: per-slot expert load, recorded on the device (CUDA-graph safe);
- ``dispatch``: logical -> physical remapping of each token's top-k;
- ``waterfill``: the shared expert's work sent to less loaded ranks;
- ``migration``: online expert-weight migration over torch.distributed, two-phase per layer;
- ``rebalancer``: the online loop (recorded load -> decision -> moved weights -> new dispatch tables);
- ``moe``: the reference expert-parallel MoE layer and its dense twin;
- ``hashing`` (with its Triton twin ``hashing_triton``) and ``backend``: the counter hash and the
  Triton-or-torch rule every kernel shares.

Nothing here is imported by ``import eplb`` until used.
"""
