"""Real expert loads bundled with eplb (origins and licenses in ``eplb/data/README.md``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from eplb.errors import EplbError
from eplb.io.loads import LoadFile, read_load

# name -> file in eplb/data
EXAMPLES = {
    # DeepSeek-V3-0324 on MMLU: 61 layers (0-2 dense) x 256 experts, one step.
    "deepseek-v3-mmlu": "deepseek-v3-0324-mmlu-8k.json",
    # OLMoE-1B-7B: layers 0, 7, 15 x 64 experts, one step per text domain.
    "olmoe": "olmoe_expert_counts.json",
}
DEFAULT_EXAMPLE = "deepseek-v3-mmlu"


def example_path(name: str = DEFAULT_EXAMPLE) -> Path:
    """The file of bundled example ``name`` (one of ``EXAMPLES``)."""
    if name not in EXAMPLES:
        raise EplbError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}")
    return Path(str(resources.files("eplb") / "data" / EXAMPLES[name]))


def read_example(name: str = DEFAULT_EXAMPLE, *, domain: str | None = None) -> LoadFile:
    """Read bundled example ``name``; ``domain`` picks one domain of ``"olmoe"``."""
    return read_load(example_path(name), domain=domain)
