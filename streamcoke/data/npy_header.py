"""The header of an ``.npy`` payload, parsed without unpickling anything."""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np


class NpyHeader(NamedTuple):
    end: int  # bytes of magic and header: the values start here
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    count: int  # values in the array


def npy_header(data: bytes) -> NpyHeader:
    """The header at the start of ``data``; ValueError where there is none, or where the
    array holds Python objects (those would need unpickling)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy file")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    if end > len(data):
        raise ValueError("truncated .npy header")
    f = io.BytesIO(bytes(data[:end]))
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if dtype.hasobject:
        raise ValueError("holds Python objects; refusing to unpickle")
    return NpyHeader(end, shape, fortran, dtype, int(np.prod(shape)))
