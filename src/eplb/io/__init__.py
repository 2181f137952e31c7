"""Files in and out: expert-load statistics readers, placement writers for the serving engines,
and the bundled example loads.

- ``read_load(path) -> LoadFile``: SGLang dumps, TensorRT-LLM statistics, JSON, CSV, numpy,
  torch and safetensors files (``eplb.io.loads`` lists the layouts);
- ``write_placement(placement, path, format)`` / ``read_placement(path)``: eplb's own JSON, SGLang
  ``--init-expert-location``, TensorRT-LLM load-balancer YAML, vLLM map (``eplb.io.placements``);
- ``eplb.io.dumps``: the recorder's dump writers (eplb's own and SGLang's), read back by ``read_load``;
- ``example_path()`` / ``read_example()``: real DeepSeek-V3 and OLMoE loads shipped with eplb;
- ``atomic_write``: how every file is written (a reader never sees half of one).
"""

from eplb.io.atomic import atomic_write
from eplb.io.examples import DEFAULT_EXAMPLE, EXAMPLES, example_path, read_example
from eplb.io.loads import LOAD_KEYS, LoadFile, read_load
from eplb.io.placements import (
    PLACEMENT_FORMATS,
    PlacementFile,
    read_placement,
    read_placement_file,
    write_placement,
)

__all__ = [
    "DEFAULT_EXAMPLE",
    "EXAMPLES",
    "LOAD_KEYS",
    "PLACEMENT_FORMATS",
    "LoadFile",
    "PlacementFile",
    "atomic_write",
    "example_path",
    "read_example",
    "read_load",
    "read_placement",
    "read_placement_file",
    "write_placement",
]
