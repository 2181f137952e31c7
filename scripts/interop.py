"""Run the engines' own code against eplb (by hand; CI does not install the engines).

    python scripts/interop.py [--cache .whl]

1. ``pip download --no-deps`` vLLM's wheel and sdist (``VLLM``) into the cache (git ignores ``.whl/``);
2. unpacks the wheel's Python files only (no compiled kernels) into ``<cache>/vllm-site``;
3. stubs the third-party packages vLLM imports at module level but never uses on the policy path
   (``STUBS``: each stubbed module prints at the end);
4. runs vLLM's ``tests/distributed/test_eplb_algo.py`` from the sdist with one import swapped:
   ``DefaultEplbPolicy`` is ``eplb.integrations.vllm.EplbPolicy``;
5. runs ``tests/integrations`` with vLLM importable, so the engine-comparing tests run too.

Exits non-zero when a test fails. Results and versions: docs/interop.md.
"""

from __future__ import annotations

import argparse
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
# Imported by vllm/__init__ and vllm.distributed at module level, unused by the EPLB policy code.
STUBS = ("psutil zmq transformers huggingface_hub aiohttp pybase64 cachetools cbor2 msgspec uvloop "
         "prometheus_client llguidance xgrammar").split()
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
        if name.split(".")[0] in STUBS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        self.stubbed.append(spec.name)
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def pytest_configure(config) -> None:
    """As a pytest plugin (``-p interop``): stub the modules in ``STUBS``."""
    sys.meta_path.insert(0, _StubFinder())


def pytest_unconfigure(config) -> None:
    names = sorted({name.split(".")[0] for name in _StubFinder.stubbed})
    print(f"\nstubbed (imported, never used): {', '.join(names) or 'none'}")


def fetch(cache: Path) -> tuple[Path, Path]:
    """The vLLM wheel and sdist in ``cache``, downloaded once."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"vllm-{VLLM}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), f"vllm=={VLLM}"],
                       check=True)
        wheels = sorted(cache.glob(f"vllm-{VLLM}-*.whl"))
    sdist = cache / f"vllm-{VLLM}.tar.gz"
    if not sdist.exists():
        # pip cannot download vLLM's sdist without building its metadata (CUDA, cmake): fetch the
        # file named in PyPI's simple index instead.
        import json
        import urllib.request
        request = urllib.request.Request("https://pypi.org/simple/vllm/",
                                         headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
        url = next(f["url"] for f in files if f["filename"] == sdist.name)
        sdist.write_bytes(urllib.request.urlopen(url, timeout=300).read())
    return wheels[0], sdist


def unpack(wheel: Path, sdist: Path, cache: Path) -> tuple[Path, Path]:
    """The wheel's Python files under ``cache/vllm-site``; vLLM's policy test, import swapped,
    under ``cache/vllm-tests``."""
    site = cache / "vllm-site"
    if not (site / "vllm" / "__init__.py").exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site, [n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    tests = cache / "vllm-tests"
    tests.mkdir(exist_ok=True)
    with tarfile.open(sdist) as archive:
        text = archive.extractfile(f"vllm-{VLLM}/{VLLM_TEST}").read().decode()
    if SWAP[0] not in text:
        raise SystemExit(f"vLLM's {VLLM_TEST} no longer imports DefaultEplbPolicy as expected; update SWAP")
    (tests / "test_eplb_algo_vllm.py").write_text(text.replace(SWAP[0], SWAP[1]))
    return site, tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".whl")
    args = parser.parse_args()
    wheel, sdist = fetch(args.cache)
    site, tests = unpack(wheel, sdist, args.cache)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(root / "scripts"), str(root / "src")]))
    status = 0
    for target in (str(tests / "test_eplb_algo_vllm.py"), str(root / "tests" / "integrations")):
        print(f"== vLLM {VLLM}: {target}", flush=True)
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "interop", "-p", "no:cacheprovider",
                   "--rootdir", str(tests if "vllm-tests" in target else root), target]
        status |= subprocess.run(command, env=env, cwd=str(root)).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
