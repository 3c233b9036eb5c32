"""GGUF files (llama.cpp) -> ModelConfig + flat jaxllm params.

The config comes from the `{arch}.*` metadata keys, read by the family of the file's
`general.architecture` (jaxllm.models.registry), whose GGUF name table maps the tensors.
Weights are dequantized one tensor at a time with `gguf.quants.dequantize` (float32), so peak
memory is the converted model plus one tensor. llama.cpp's converter reorders the rows of each Llama q/k head from HF's
"rotate half" layout to interleaved pairs (its rope kernel rotates adjacent elements); we
undo that so the weights match the HF layout the model implements.

With `keep_blocks=True`, Q4_0 / Q4_1 / Q8_0 matrices are not dequantized but repacked
(`jaxllm.kernels.quantized_weights.PackedWeight`; the q/k row order is undone on the blocks'
rows), for the quantized matmul: the weights they stand for are bit-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.conversions.common import LoadedCheckpoint
from jaxllm.kernels.quantized_weights import PACKABLE_GGUF_TYPES, PackedWeight, pack_gguf_rows
from jaxllm.models.base import ModelFamily
from jaxllm.models.dtypes import resolve_param_dtype
from jaxllm.models.params import check_params
from jaxllm.models.registry import family_for, family_for_gguf

logger = logging.getLogger(__name__)

_MISSING = object()


def is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs -> first half | second half.

    Rows of head h are stored as (x0, y0, x1, y1, ...); HF expects (x0, x1, ..., y0, y1, ...).
    Works on a [rows, in] weight or a [rows] bias.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/foreign files
        raise ValueError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from e


class _Metadata:
    """A GGUF reader seen as `jaxllm.models.base.GGUFMetadata` (what families read)."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._reader, self.path = reader, path
        self.tensor_shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise ValueError(f"{self.path}: GGUF metadata key {key} is missing")
            return default
        return field.contents()


def gguf_hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """An HF-style config.json dict built from the GGUF metadata by the architecture's family."""
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    try:
        family = family_for_gguf(arch)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return family.config_from_gguf(meta)


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    import gguf

    try:
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError as e:
        raise ValueError(f"{path}: tensor {tensor.name} has unsupported GGUF type "
                         f"{tensor.tensor_type.name}") from e


def _packed(tensor: Any, transpose: bool, permuted_heads: int | None) -> PackedWeight:
    """A quantized GGUF matrix kept in blocks. Its raw rows are output rows (ggml's second
    axis): a linear kernel's output features (stored transposed) or an embedding's tokens."""
    rows = np.asarray(tensor.data, dtype=np.uint8).reshape(int(tensor.shape[1]), -1)
    if permuted_heads is not None:
        rows = unpermute_rope_rows(rows, permuted_heads)
    return pack_gguf_rows(tensor.tensor_type.name, rows, int(tensor.shape[0]), as_table=not transpose)


def load_gguf(path: str | Path, dtype: str = "auto", progress: bool = False, *,
              keep_blocks: bool = False) -> LoadedCheckpoint:
    """Load a .gguf file. See `jaxllm.conversions.load_checkpoint`.

    keep_blocks: matrices stored as Q4_0/Q4_1/Q8_0 become `PackedWeight`s (float32 dtype only);
    other tensors load as usual.
    """
    path = Path(path)
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader, path)
    cfg = ModelConfig.from_hf_dict(hf_config)
    family: ModelFamily = family_for(cfg.architecture)
    gguf_arch = hf_config["model_type"]
    expected = family.param_shapes(cfg)

    plan: list[tuple[Any, str, bool]] = []
    for t in reader.tensors:
        mapped = family.gguf_names.to_jaxllm(t.name)
        if mapped is None:
            raise ValueError(f"{path}: unrecognized tensor {t.name} for {cfg.architecture}")
        name, transpose = mapped
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {t.name} for {cfg.architecture}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the fastest axis first
        want = expected[name][::-1] if transpose else expected[name]
        if shape != want:
            raise ValueError(f"{path}: tensor {t.name} has shape {shape}, expected {want}")
        plan.append((t, name, transpose))
    missing = sorted(set(expected) - {name for _, name, _ in plan})
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    out_dtype = resolve_param_dtype(dtype, cfg.torch_dtype)
    if keep_blocks and out_dtype != np.float32:
        raise ValueError(f"weights kept in quantization blocks compute in float32, not {out_dtype}")
    params: dict[str, Any] = {}
    for t, name, transpose in tqdm(plan, desc="dequantizing", unit="tensor", disable=not progress):
        permuted_heads = family.gguf_permuted_heads(cfg, gguf_arch, name)
        if keep_blocks and t.tensor_type.name in PACKABLE_GGUF_TYPES and len(t.shape) == 2:
            params[name] = _packed(t, transpose, permuted_heads)
            continue
        w = _dequantize(t, path).reshape(tuple(int(d) for d in reversed(t.shape)))
        if permuted_heads is not None:
            w = unpermute_rope_rows(w, permuted_heads)
        params[name] = np.array(w.T if transpose else w, dtype=out_dtype, order="C")
    check_params(cfg, params, str(path))

    generation_config = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if k in hf_config}
    return LoadedCheckpoint(config=cfg, params=params, generation_config=generation_config,
                            tokenizer_path=path, source_format="gguf", hf_config=hf_config)
