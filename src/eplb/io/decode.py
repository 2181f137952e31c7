"""Decoding of the container formats (JSON, YAML, torch, numpy, safetensors, CSV) into plain Python.

Each loader turns any failure of its library into an EplbError that names the file, so the
readers above it only deal with content. The optional libraries are imported on first use.
"""

from __future__ import annotations

import csv
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eplb.errors import EplbError

# What a library or a reader raises on content it did not expect: a corrupt or foreign file, never
# a bug of the caller's (EplbError, a ValueError, passes through unchanged).
CONTENT_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError,
                  RuntimeError, NotImplementedError, UnicodeError)


@contextmanager
def content_errors(path: Path, what: str, fix: str) -> Iterator[None]:
    """Turn any unexpected failure on the content of ``path`` into one EplbError line:
    "``path`` is not a valid ``what`` (the error); ``fix``"."""
    try:
        yield
    except EplbError:
        raise
    except CONTENT_ERRORS as exc:
        raise EplbError(f"{path} is not a valid {what} ({type(exc).__name__}: {first_line(exc)}); {fix}") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library messages can run to a paragraph)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def require_file(path: Path, what: str) -> None:
    """Raise EplbError unless ``path`` is an existing file (``what`` names it in the message)."""
    if not path.exists():
        raise EplbError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise EplbError(f"{what} {path} is not a file; pass a file")


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise EplbError(f"{path} is not valid JSON ({first_line(exc)}); check the file is complete") from None
    except RecursionError:
        raise EplbError(f"{path} nests JSON too deeply to be statistics or a placement; check the file") from None


def load_yaml(path: Path) -> Any:
    yaml = import_yaml()
    try:
        with open(path, encoding="utf-8") as f:
            # libyaml's loader where PyYAML has it: ~10x faster on a 61-layer assignment table.
            return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, ValueError) as exc:
        raise EplbError(f"{path} is not valid YAML ({first_line(exc)}); check the file is complete") from None
    except RecursionError:
        raise EplbError(f"{path} nests YAML too deeply to be a placement; check the file") from None


def load_torch(path: Path) -> Any:
    try:
        # weights_only: a statistics or placement file never needs to run code to load. A corrupt
        # file can make torch warn (pickle protocol) before it fails: the failure is the one line.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a torch save
        raise EplbError(
            f"cannot read {path} as a torch file ({first_line(exc)}); pass a torch.save of tensors, lists and dicts"
        ) from None


def load_numpy(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """An ``.npy`` array, or the arrays of an ``.npz`` archive by name."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return data
        with data:
            return {name: data[name] for name in data.files}
    except Exception as exc:  # format, pickle and zip errors alike
        raise EplbError(
            f"cannot read {path} as a numpy file ({first_line(exc)}); pass an .npy or .npz written by numpy"
        ) from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise EplbError(f"reading {path} needs the safetensors package; pip install safetensors") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError and header errors
        raise EplbError(
            f"cannot read {path} as a safetensors file ({first_line(exc)}); check the file is complete"
        ) from None


def load_csv(path: Path) -> list[list[float]]:
    """The numeric rows of a CSV file; a first row without any number is taken as a header."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (ValueError, csv.Error) as exc:
        raise EplbError(
            f"{path} is not a readable CSV text file ({first_line(exc)}); write one row per layer"
        ) from None
    # A header holds names only: a first row with some numbers is data (12,N/A,7 is a broken layer).
    if rows and not any(_is_number(cell) for cell in rows[0]):
        rows = rows[1:]
    for number, row in enumerate(rows, start=1):
        bad = [cell for cell in row if not _is_number(cell)]
        if bad:
            raise EplbError(
                f"{path} has a non-numeric cell {bad[0]!r} in data row {number}; "
                "write one row per layer and one number per expert"
            )
    return [[float(cell) for cell in row] for row in rows]


def import_yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise EplbError("the TensorRT-LLM YAML format needs PyYAML; pip install pyyaml") from None
    return yaml


def sniff(path: Path) -> str:
    """The extension whose loader fits ``path``'s content, for files named otherwise.

    Raises EplbError when the content matches none of them.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"\x93NUMPY"):
        return ".npy"
    if head.startswith(b"PK\x03\x04"):
        # Both torch.save and np.savez write zip archives; torch's holds a pickle, numpy's .npy members.
        try:
            with zipfile.ZipFile(path) as archive:
                return ".pt" if any(n.endswith("data.pkl") for n in archive.namelist()) else ".npz"
        except zipfile.BadZipFile:
            return ".npz"  # a broken archive: numpy's loader reports it
    if head.startswith(b"\x80"):
        return ".pt"  # a pickle: torch's legacy (non-zip) format
    if len(head) > 8 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return ".safetensors"  # an 8-byte header length, then the JSON header
    if head.lstrip()[:1] in (b"{", b"["):
        return ".json"
    if b"," in head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return ".csv"
    raise EplbError(
        f"cannot tell the format of {path} from its name or content; "
        "use a .json, .csv, .npy, .npz, .pt or .safetensors file"
    )


def placement_loader(path: Path) -> Callable[[Path], Any]:
    """The loader of a placement file by its content (a torch save, JSON, else YAML), whatever its name;
    a ``.pt`` file that is none of them is reported as a broken torch save."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return load_torch
    if head.lstrip()[:1] in (b"{", b"["):
        return load_json
    return _yaml_or_torch if path.suffix.lower() in (".pt", ".pth") else load_yaml


def _yaml_or_torch(path: Path) -> Any:
    try:
        data = load_yaml(path)
    except EplbError:
        data = None
    if isinstance(data, dict):
        return data
    return load_torch(path)  # raises: the content is not a torch save either


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


Loader = Callable[[Path], Any]

# The loader of each extension; ``sniff`` maps other names onto these keys.
LOADERS: dict[str, Loader] = {
    ".json": load_json,
    ".csv": load_csv,
    ".npy": load_numpy,
    ".npz": load_numpy,
    ".pt": load_torch,
    ".pth": load_torch,
    ".safetensors": load_safetensors,
}
