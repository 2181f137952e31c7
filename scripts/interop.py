"""Run the engines' own code against eplb (by hand; CI does not install the engines).

    python scripts/interop.py [--cache .whl] [--trtllm-src DIR]

1. ``pip download --no-deps`` the vLLM and SGLang wheels (``VLLM``, ``SGLANG``) and vLLM's sdist into
   the cache (git ignores ``.whl/``);
2. unpacks the wheels' Python files only (no compiled kernels) into ``<cache>/<engine>-site``;
3. stubs the third-party packages the engines import at module level but never use on the EPLB path
   (``STUBS``: the ones imported are printed at the end);
4. runs vLLM's ``tests/distributed/test_eplb_algo.py`` from the sdist with one import swapped:
   ``DefaultEplbPolicy`` is ``eplb.integrations.vllm.EplbPolicy``;
5. runs ``tests/integrations`` with each engine importable, so the engine-comparing tests run too;
6. TensorRT-LLM: PyPI has no source of it (its sdists are wheel stubs that fetch the wheel from
   NVIDIA's own index at install time), so its config classes come from ``--trtllm-src DIR``, a
   TensorRT-LLM source tree (``DIR/tensorrt_llm/llmapi/llm_args.py``). Only the load-balancer
   classes are run (``trtllm_modules``); without a tree the step is skipped, saying so.

Exits non-zero when a test fails. Results and versions: docs/interop.md.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

VLLM = "0.34.0"
SGLANG = "0.5.23"
# Imported at module level by each engine's package, unused on its EPLB path. Each engine runs with
# its own list: SGLang patches transformers when it imports, so it must not see a stubbed one.
STUBS = {
    "vllm": ("psutil zmq transformers huggingface_hub aiohttp pybase64 cachetools cbor2 msgspec uvloop "
             "prometheus_client llguidance xgrammar").split(),
    "sglang": "psutil pybase64 starlette msgspec zmq tqdm aiohttp".split(),
    "trtllm": [],
}
STUBS_ENV = "EPLB_INTEROP_ENGINE"
TRTLLM = "1.2.1"  # the newest TensorRT-LLM release on PyPI: only its wheel-stub sdist is there
TRTLLM_ENV = "EPLB_INTEROP_TRTLLM_SRC"
# TensorRT-LLM's YAML path: llm_args.py's classes, and TorchLlmArgs reduced to this one validator.
TRTLLM_CLASSES = ("StrictBaseModel", "MoeLoadBalancerConfig")
TRTLLM_VALIDATOR = ("TorchLlmArgs", "validate_load_balancer")
# The globals llm_args.py imports that these classes use.
TYPING_NAMES = ("Any", "Dict", "List", "Literal", "Optional", "Union")
PYDANTIC_NAMES = ("BaseModel", "ConfigDict", "Field", "PrivateAttr", "field_validator", "model_validator")
# What stands in for the rest of TensorRT-LLM (printed with each run).
TRTLLM_STUBS = (
    "tensorrt_llm, tensorrt_llm.llmapi: empty packages (the real ones load the compiled bindings)",
    "tensorrt_llm._torch: holds only MoeLoadBalancerConfig (older validators import it from there)",
    "llm_args' module globals: typing names, pydantic, os and yaml only; Field is pydantic's (llm_args' "
    "wrapper adds schema metadata only when given status= or telemetry=, which these classes do not pass)",
    "TorchLlmArgs: its validate_load_balancer alone, no base class; called on an object with "
    "moe_config.load_balancer only",
)
VLLM_TEST = "tests/distributed/test_eplb_algo.py"
SWAP = ("from vllm.distributed.eplb.policy.default import DefaultEplbPolicy",
        "from eplb.integrations.vllm import EplbPolicy as DefaultEplbPolicy")


class _Meta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(name)

    def __getitem__(cls, item):
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__


def _stub(name: str) -> type:
    # A class that accepts any use at import time: attribute, call, subscript, subclassing.
    return _Meta(name, (), {"__init__": lambda self, *a, **k: None, "__call__": lambda self, *a, **k: self,
                            "__init_subclass__": classmethod(lambda cls, **k: None)})


class _StubModule(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _stub(name)
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    stubbed: list[str] = []

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUBS[os.environ[STUBS_ENV]]:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        self.stubbed.append(spec.name)
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def pytest_configure(config) -> None:
    """As a pytest plugin (``-p interop``): stub the modules of ``STUBS[$EPLB_INTEROP_ENGINE]``, and with
    ``$EPLB_INTEROP_TRTLLM_SRC`` make TensorRT-LLM's load-balancer classes importable."""
    sys.meta_path.insert(0, _StubFinder())
    if os.environ.get(TRTLLM_ENV):
        trtllm_modules(Path(os.environ[TRTLLM_ENV]))


def pytest_unconfigure(config) -> None:
    names = sorted({name.split(".")[0] for name in _StubFinder.stubbed})
    print(f"\nstubbed (imported, never used): {', '.join(names) or 'none'}")
    if os.environ.get(TRTLLM_ENV):
        print("TensorRT-LLM stand-ins:\n  " + "\n  ".join(TRTLLM_STUBS))


def trtllm_modules(src: Path) -> None:
    """``tensorrt_llm.llmapi.llm_args`` holding TensorRT-LLM's own ``StrictBaseModel``,
    ``MoeLoadBalancerConfig`` and ``TorchLlmArgs.validate_load_balancer``, read from the source tree
    ``src`` and run unchanged; the rest of TensorRT-LLM is ``TRTLLM_STUBS``."""
    import typing

    import pydantic
    import yaml

    found: dict[str, ast.stmt] = {}
    llmapi = src / "tensorrt_llm" / "llmapi"
    for path in (llmapi / "utils.py", llmapi / "llm_args.py"):
        if not path.exists():
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.ClassDef) and node.name in TRTLLM_CLASSES:
                found[node.name] = node
            elif isinstance(node, ast.ClassDef) and node.name == TRTLLM_VALIDATOR[0]:
                node.body = [m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == TRTLLM_VALIDATOR[1]]
                node.bases, node.keywords, node.decorator_list = [], [], []
                found[node.name] = node
    missing = [name for name in (*TRTLLM_CLASSES, TRTLLM_VALIDATOR[0]) if name not in found]
    if missing or not found[TRTLLM_VALIDATOR[0]].body:
        raise SystemExit(f"{llmapi} lacks {', '.join(missing) or '.'.join(TRTLLM_VALIDATOR)}: not a TensorRT-LLM "
                         "with the pydantic MoeLoadBalancerConfig in llm_args.py")
    packages = {name: types.ModuleType(name) for name in ("tensorrt_llm", "tensorrt_llm.llmapi", "tensorrt_llm._torch")}
    for module in packages.values():
        module.__path__ = []
    llm_args = types.ModuleType("tensorrt_llm.llmapi.llm_args")
    llm_args.__package__ = "tensorrt_llm.llmapi"
    llm_args.__dict__.update(os=os, yaml=yaml, **{name: getattr(typing, name) for name in TYPING_NAMES},
                             **{name: getattr(pydantic, name) for name in PYDANTIC_NAMES})
    body = ast.Module(body=[found[name] for name in (*TRTLLM_CLASSES, TRTLLM_VALIDATOR[0])], type_ignores=[])
    exec(compile(ast.fix_missing_locations(body), str(llmapi / "llm_args.py"), "exec"), llm_args.__dict__)
    packages["tensorrt_llm._torch"].MoeLoadBalancerConfig = llm_args.MoeLoadBalancerConfig
    sys.modules.update(packages, **{llm_args.__name__: llm_args})


def wheel(cache: Path, package: str, version: str) -> Path:
    """The wheel of ``package==version`` in ``cache``, downloaded once."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache),
                        f"{package}=={version}"], check=True)
        found = sorted(cache.glob(f"{package}-{version}-*.whl"))
    return found[0]


def pypi_file(cache: Path, project: str, filename: str) -> Path:
    """``filename`` of PyPI's ``project`` in ``cache``, downloaded once. pip cannot download an sdist
    without building its metadata (vLLM's needs CUDA and cmake, TensorRT-LLM's fetches its wheel from
    NVIDIA), so the file named in PyPI's simple index is fetched instead."""
    target = cache / filename
    if not target.exists():
        import json
        import urllib.request
        request = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                         headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
        url = next(f["url"] for f in files if f["filename"] == filename)
        cache.mkdir(parents=True, exist_ok=True)
        target.write_bytes(urllib.request.urlopen(url, timeout=300).read())
    return target


def unpack(archive_path: Path, package: str, cache: Path) -> Path:
    """The wheel's Python files under ``cache/<package>-site``."""
    site = cache / f"{package}-site"
    if not (site / package / "__init__.py").exists():
        with zipfile.ZipFile(archive_path) as archive:
            names = [n for n in archive.namelist() if n.startswith(f"{package}/") and n.endswith(".py")]
            archive.extractall(site, names)
    return site


def vllm_test(sdist: Path, cache: Path) -> Path:
    """vLLM's policy test, import swapped, under ``cache/vllm-tests``."""
    tests = cache / "vllm-tests"
    tests.mkdir(exist_ok=True)
    with tarfile.open(sdist) as archive:
        text = archive.extractfile(f"vllm-{VLLM}/{VLLM_TEST}").read().decode()
    if SWAP[0] not in text:
        raise SystemExit(f"vLLM's {VLLM_TEST} no longer imports DefaultEplbPolicy as expected; update SWAP")
    target = tests / "test_eplb_algo_vllm.py"
    target.write_text(text.replace(SWAP[0], SWAP[1]))
    return target


def trtllm_source(cache: Path, given: Path | None) -> Path | None:
    """The TensorRT-LLM source tree to run, or None (printing why) when there is none."""
    if given is not None:
        if not (given / "tensorrt_llm" / "llmapi" / "llm_args.py").exists():
            raise SystemExit(f"--trtllm-src {given} has no tensorrt_llm/llmapi/llm_args.py; pass a TensorRT-LLM tree")
        return given
    # What PyPI has: a wheel-stub sdist, checked here so that a release that ships its sources is used.
    sdist = pypi_file(cache, "tensorrt-llm", f"tensorrt_llm-{TRTLLM}.tar.gz")
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    if f"tensorrt_llm-{TRTLLM}/tensorrt_llm/llmapi/llm_args.py" in names:
        site = cache / "trtllm-src"
        if not (site / "tensorrt_llm").exists():
            with tarfile.open(sdist) as archive:
                archive.extractall(cache, filter="data")
            (cache / f"tensorrt_llm-{TRTLLM}").rename(site)
        return site
    print(f"== TensorRT-LLM {TRTLLM}: skipped. PyPI's sdist ({sdist.stat().st_size} bytes: {', '.join(names)}) is "
          "a wheel stub without sources (pip download builds it, and it fetches the wheel from NVIDIA's own "
          "index); pass --trtllm-src DIR, a TensorRT-LLM source tree", flush=True)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".whl")
    parser.add_argument("--trtllm-src", type=Path, help="A TensorRT-LLM source tree (holding tensorrt_llm/).")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sites = {name: unpack(wheel(args.cache, name, version), name, args.cache)
             for name, version in (("vllm", VLLM), ("sglang", SGLANG))}
    test = vllm_test(pypi_file(args.cache, "vllm", f"vllm-{VLLM}.tar.gz"), args.cache)
    runs = [(f"vLLM {VLLM}: its own {VLLM_TEST}", "vllm", test, test.parent),
            (f"vLLM {VLLM}: tests/integrations", "vllm", root / "tests" / "integrations", root),
            (f"SGLang {SGLANG}: tests/integrations", "sglang", root / "tests" / "integrations", root)]
    trtllm = trtllm_source(args.cache, args.trtllm_src)
    if trtllm is not None:
        sites["trtllm"] = trtllm
        runs.append((f"TensorRT-LLM ({trtllm}): tests/integrations", "trtllm", root / "tests" / "integrations", root))
    status = 0
    for title, engine, target, rootdir in runs:
        print(f"== {title}", flush=True)
        path = os.pathsep.join([str(sites[engine]), str(root / "scripts"), str(root / "src")])
        env = dict(os.environ, PYTHONPATH=path, **{STUBS_ENV: engine})
        if engine == "trtllm":
            env[TRTLLM_ENV] = str(trtllm)
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "interop", "-p", "no:cacheprovider",
                   "--rootdir", str(rootdir), str(target)]
        status |= subprocess.run(command, env=env, cwd=str(root)).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
