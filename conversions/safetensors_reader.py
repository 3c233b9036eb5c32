"""A memory-mapped safetensors reader that returns numpy arrays, bfloat16 included.

`safetensors`' own numpy backend cannot return bfloat16, and its other backends would pull
in torch or place arrays on a device. The format is a little-endian u64 header length, a
JSON header `{name: {dtype, shape, data_offsets}}` and one flat data region, so reading it
with `np.memmap` is short, touches only the tensors asked for, and lets us validate every
offset (a truncated or corrupt file becomes a clear error instead of garbage weights).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER_BYTES = 100 << 20


class SafetensorsFile:
    """Header of one .safetensors file plus lazy, validated access to its tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: corrupt safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"{self.path}: corrupt safetensors file (header length "
                                 f"{header_len} does not fit in {size} bytes)")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: corrupt safetensors file (bad JSON header: {e})") from e
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors file (header is not an object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._data_len = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._validate(name, entry)

    def _validate(self, name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            dtype_s, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: corrupt header entry for tensor {name}") from e
        if dtype_s not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {dtype_s}")
        dtype = _DTYPES[dtype_s]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= begin <= end <= self._data_len) or end - begin != nbytes:
            raise ValueError(f"{self.path}: corrupt or truncated safetensors file: tensor {name} "
                             f"claims bytes [{begin}, {end}) but the data region has "
                             f"{self._data_len} bytes and the tensor needs {nbytes}")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until the caller makes one)."""
        if name not in self._entries:
            raise KeyError(f"tensor {name} not in {self.path}")
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin,
                       shape=(end - begin,))
        return mm.view(dtype).reshape(shape)
