"""Checkpoint files: tensors in safetensors format plus JSON metadata, written atomically.

Loading never unpickles: a safetensors file holds raw tensor bytes and a JSON header, so a
corrupt or hostile file can at worst fail to parse.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

FORMAT_KEY = "streamcoke_format"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    kind: str) -> None:
    """Save host copies of ``tensors`` and JSON-serialisable ``meta`` under a format tag ``kind``."""
    host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {FORMAT_KEY: kind, "meta": json.dumps(meta)}
    atomic_write_bytes(path, _st_save(host, metadata=header))


def load_checkpoint(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_checkpoint`; clear ``ValueError`` on anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}") from None
    try:
        tensors = _st_load(data)
        header = _read_header(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not a streamcoke checkpoint (unreadable: {exc})") from None
    found = header.get(FORMAT_KEY)
    if found != kind:
        raise ValueError(
            f"{str(path)!r} is not a {kind} checkpoint (format tag: {found!r})")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{str(path)!r} has a damaged metadata header") from None
    return tensors, meta


def _read_header(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds the file")
    return json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__", {}) or {}
