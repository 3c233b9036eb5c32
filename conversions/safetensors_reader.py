"""One .safetensors file read through the `safetensors` library, with errors that name it.

The library does the parsing and validation (header, offsets, truncation) and returns one
tensor at a time as a fresh numpy array, bfloat16 included; this wrapper only turns its
`SafetensorError`s into `ValueError`s that name the file and tensor, and caches the names.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

# safetensors' numpy backend builds bfloat16 arrays with np.dtype("bfloat16"), a name numpy
# only knows once ml_dtypes is imported (it registers the type). Import it before any read.
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import SafetensorError, safe_open


class SafetensorsFile:
    """An open .safetensors file: tensor names, header shape/dtype, and per-tensor reads.

    Opening parses only the header; `get` copies one tensor out of the memory-mapped file,
    so peak memory while loading is about one tensor. Use as a context manager or `close()`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        try:
            self._handle = safe_open(self.path, framework="numpy")
        except SafetensorError as e:
            raise ValueError(f"{self.path}: corrupt or truncated safetensors file ({e})") from e
        self._keys = tuple(self._handle.keys())
        self._names = frozenset(self._keys)

    def keys(self) -> tuple[str, ...]:
        return self._keys

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def _slice(self, name: str):
        if name not in self._names:
            raise KeyError(f"tensor {name} not in {self.path}")
        try:
            return self._handle.get_slice(name)
        except SafetensorError as e:
            raise ValueError(f"{self.path}: cannot read header of tensor {name} ({e})") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_code(self, name: str) -> str:
        """The safetensors dtype code from the header ("F32", "BF16", "I64", ...)."""
        return self._slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array (a copy; the file may be closed afterwards)."""
        if name not in self._names:
            raise KeyError(f"tensor {name} not in {self.path}")
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, TypeError) as e:
            raise ValueError(f"{self.path}: cannot read tensor {name} ({e})") from e

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only the part `index` (one slice per axis) of the tensor, as a new numpy array in
        the stored dtype: the rest of the tensor is never read from the file."""
        view = self._slice(name)
        try:
            return np.asarray(view[index])
        except (SafetensorError, TypeError) as e:
            raise ValueError(f"{self.path}: cannot read tensor {name}[{index}] ({e})") from e

    def close(self) -> None:
        self._handle.__exit__(None, None, None)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
