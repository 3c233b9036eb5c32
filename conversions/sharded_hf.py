"""HF safetensors read straight into device shards: no full host copy of the checkpoint.

`load_checkpoint` reads every tensor to host and the engine then places it. Here each
parameter is created with `jax.make_array_from_callback` on its target sharding: jax asks
for the slice each local device owns, and that slice alone is read from the memory-mapped
file (safetensors' slice API), transposed to jaxllm's [in, out], cast and copied to the
device. So host memory holds about one tensor slice at a time, each process reads only what
its devices own, and a bfloat16 checkpoint loaded as bfloat16 is never widened to float32.
Devices holding the same slice (replicated axes) share one read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Sharding

from jaxllm.config import ModelConfig
from jaxllm.conversions.common import LoadedCheckpoint
from jaxllm.conversions.hf import checkpoint_dtype, close_all, open_files, plan_params
from jaxllm.conversions.safetensors_reader import SafetensorsFile
from jaxllm.models.dtypes import resolve_param_dtype
from jaxllm.models.registry import family_for
from jaxllm.models.stacked_names import stacked_slot

CHUNK_BYTES = 1 << 20  # source rows read per piece (bounds the host memory beyond the result)

# (flat param name, its shape) -> where the parameter goes.
ShardingFor = Callable[[str, tuple[int, ...]], Sharding]


class _ParamSource:
    """Where one jaxllm parameter's values are in the checkpoint: one tensor, or (stacked
    parameters) one tensor per index of the first axis."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.slots: dict[int | None, tuple[SafetensorsFile, str, bool]] = {}
        self._last: tuple[tuple, np.ndarray] | None = None

    def _read_into(self, out: np.ndarray, slot: int | None, index: tuple[slice, ...]) -> None:
        """Fill `out` with the window `index` of one source tensor, cast to out's dtype.

        Read in chunks of ~CHUNK_BYTES of source rows, each cast (and transposed from the
        file's [out, in]) straight into `out`: host memory is the result plus one chunk.
        """
        f, hf_name, transpose = self.slots[slot]
        src_index = index[::-1] if transpose else index
        rows = range(f.shape(hf_name)[0])[src_index[0]]
        row_bytes = max(1, out.nbytes // max(1, len(rows)))
        step = max(1, CHUNK_BYTES // row_bytes)
        for i in range(0, len(rows), step):
            piece = f.get_slice(hf_name, (slice(rows.start + i, rows.start + min(i + step, len(rows))),
                                          *src_index[1:]))
            if transpose:
                out[:, i:i + step] = piece.T
            else:
                out[i:i + step] = piece

    def slice(self, index: tuple[slice, ...]) -> np.ndarray:
        """The values at `index` of the parameter, in the target dtype."""
        key = tuple((s.start, s.stop, s.step) for s in index)
        if self._last is not None and self._last[0] == key:  # replicated: read once
            return self._last[1]
        shape = tuple(len(range(n)[s]) for n, s in zip(self.shape, index, strict=True))
        out = np.empty(shape, self.dtype)
        if None in self.slots:
            self._read_into(out, None, index)
        else:
            for j, slot in enumerate(range(self.shape[0])[index[0]]):
                self._read_into(out[j], slot, index[1:])
        self._last = (key, out)
        return out

    def release(self) -> None:
        """Drop the cached slice (host memory back to ~0 between tensors)."""
        self._last = None


def load_hf_dir_into(path: str | Path, sharding_for: ShardingFor,
                     dtype: str = "auto") -> LoadedCheckpoint:
    """An HF checkpoint directory with every parameter placed on `sharding_for(name, shape)`
    (see module doc). The same validation as `load_checkpoint` (names, shapes, dtypes);
    `dtype` as there. Params are jax Arrays."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_hf_dict(hf_config)
    files = open_files(path)
    try:
        params = _place_params(path, cfg, files, sharding_for, dtype)
    finally:
        close_all(files.values())
    gen_path = path / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return LoadedCheckpoint(config=cfg, params=params, generation_config=generation_config,
                            tokenizer_path=path, source_format="hf", hf_config=hf_config)


def _place_params(path: Path, cfg: ModelConfig, files: dict[str, SafetensorsFile],
                  sharding_for: ShardingFor, dtype: str) -> dict[str, jax.Array]:
    plan = plan_params(path, cfg, files)
    expected = family_for(cfg.architecture).param_shapes(cfg)
    out_dtype = np.dtype(resolve_param_dtype(dtype, checkpoint_dtype(cfg, files)))
    sources: dict[str, _ParamSource] = {}
    for hf_name, name, transpose in plan:
        base, slot = stacked_slot(name)
        src = sources.setdefault(base, _ParamSource(tuple(expected[base]), out_dtype))
        src.slots[slot] = (files[hf_name], hf_name, transpose)
    params = {}
    for name, src in sources.items():
        params[name] = jax.make_array_from_callback(src.shape, sharding_for(name, src.shape),
                                                    src.slice)
        src.release()
    return params
