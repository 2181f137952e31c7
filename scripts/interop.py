"""Run the engines' own code against eplb (by hand; CI does not install the engines).

    python scripts/interop.py [--cache .whl]

1. ``pip download --no-deps`` the vLLM and SGLang wheels (``VLLM``, ``SGLANG``) and vLLM's sdist into
   the cache (git ignores ``.whl/``);
2. unpacks the wheels' Python files only (no compiled kernels) into ``<cache>/<engine>-site``;
3. stubs the third-party packages the engines import at module level but never use on the EPLB path
   (``STUBS``: the ones imported are printed at the end);
4. runs vLLM's ``tests/distributed/test_eplb_algo.py`` from the sdist with one import swapped:
   ``DefaultEplbPolicy`` is ``eplb.integrations.vllm.EplbPolicy``;
5. runs ``tests/integrations`` with both engines importable, so the engine-comparing tests run too.

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
SGLANG = "0.5.23"
# Imported at module level by each engine's package, unused on its EPLB path. Each engine runs with
# its own list: SGLang patches transformers when it imports, so it must not see a stubbed one.
STUBS = {
    "vllm": ("psutil zmq transformers huggingface_hub aiohttp pybase64 cachetools cbor2 msgspec uvloop "
             "prometheus_client llguidance xgrammar").split(),
    "sglang": "psutil pybase64 starlette msgspec zmq tqdm aiohttp".split(),
}
STUBS_ENV = "EPLB_INTEROP_ENGINE"
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
    """As a pytest plugin (``-p interop``): stub the modules of ``STUBS[$EPLB_INTEROP_ENGINE]``."""
    sys.meta_path.insert(0, _StubFinder())


def pytest_unconfigure(config) -> None:
    names = sorted({name.split(".")[0] for name in _StubFinder.stubbed})
    print(f"\nstubbed (imported, never used): {', '.join(names) or 'none'}")


def wheel(cache: Path, package: str, version: str) -> Path:
    """The wheel of ``package==version`` in ``cache``, downloaded once."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache),
                        f"{package}=={version}"], check=True)
        found = sorted(cache.glob(f"{package}-{version}-*.whl"))
    return found[0]


def vllm_sdist(cache: Path) -> Path:
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
    return sdist


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".whl")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sites = {name: unpack(wheel(args.cache, name, version), name, args.cache)
             for name, version in (("vllm", VLLM), ("sglang", SGLANG))}
    test = vllm_test(vllm_sdist(args.cache), args.cache)
    runs = [(f"vLLM {VLLM}: its own {VLLM_TEST}", "vllm", test, test.parent),
            (f"vLLM {VLLM}: tests/integrations", "vllm", root / "tests" / "integrations", root),
            (f"SGLang {SGLANG}: tests/integrations", "sglang", root / "tests" / "integrations", root)]
    status = 0
    for title, engine, target, rootdir in runs:
        print(f"== {title}", flush=True)
        path = os.pathsep.join([str(sites[engine]), str(root / "scripts"), str(root / "src")])
        env = dict(os.environ, PYTHONPATH=path, **{STUBS_ENV: engine})
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "interop", "-p", "no:cacheprovider",
                   "--rootdir", str(rootdir), str(target)]
        status |= subprocess.run(command, env=env, cwd=str(root)).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
