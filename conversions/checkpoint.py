"""`load_checkpoint`: one entry point that picks the loader from what the path is."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxllm.conversions.common import LoadedCheckpoint
from jaxllm.conversions.gguf_loader import is_gguf_file, load_gguf
from jaxllm.conversions.hf import INDEX_FILE, SINGLE_FILE, is_hf_dir, load_hf_dir
from jaxllm.conversions.orbax_io import is_jaxllm_dir, load_jaxllm_dir


def detect_format(path: str | Path) -> str:
    """"gguf", "jaxllm" or "hf" for a model path; FileNotFoundError / ValueError otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_file():
        if is_gguf_file(path):
            return "gguf"
        raise ValueError(f"{path}: not a .gguf file; pass a model directory or a .gguf file")
    if is_jaxllm_dir(path):
        return "jaxllm"
    if is_hf_dir(path):
        return "hf"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a HF checkpoint directory) and no "
                                f"jaxllm_config.json (not a converted jaxllm directory)")
    raise FileNotFoundError(f"{path}: has config.json but no {SINGLE_FILE} or {INDEX_FILE}")


def load_checkpoint(
    path: str | Path,
    dtype: str = "auto",
    *,
    shardings: Mapping[str, Any] | None = None,
    progress: bool = False,
    keep_blocks: bool = False,
) -> LoadedCheckpoint:
    """Load a HF checkpoint directory, a `.gguf` file or a converted jaxllm directory.

    dtype: "auto" (checkpoint dtype on accelerators, float32 on CPU), "float32", "bfloat16",
    "float16" or "checkpoint" (the stored dtype; GGUF quantized weights dequantize to float32).
    Params are numpy arrays in the naming of `jaxllm.models.params`, checked with
    `check_params`. `shardings` ({name: Sharding}) places each param: orbax and HF safetensors
    read straight into it (jaxllm.conversions.sharded_hf); GGUF is loaded to host then
    `jax.device_put`. The result unpacks as
    `config, params = load_checkpoint(path)`. `keep_blocks` (GGUF only, float32, no
    shardings): Q4_0/Q4_1/Q8_0 matrices stay in blocks as `PackedWeight`s.
    """
    fmt = detect_format(path)
    if keep_blocks and (fmt != "gguf" or shardings is not None):
        raise ValueError("keep_blocks needs a .gguf checkpoint loaded without shardings")
    if fmt == "jaxllm":
        return load_jaxllm_dir(path, dtype, shardings)
    if fmt == "hf" and shardings is not None:  # each tensor's slices read straight into place
        from jaxllm.conversions.sharded_hf import load_hf_dir_into

        def sharding_for(name: str, shape: tuple[int, ...]) -> Any:
            if name not in shardings:
                raise ValueError(f"shardings: no sharding given for {name}")
            return shardings[name]

        return load_hf_dir_into(path, sharding_for, dtype)
    loaded = (load_gguf(path, dtype, progress, keep_blocks=keep_blocks) if fmt == "gguf"
              else load_hf_dir(path, dtype, progress))
    if shardings is not None:
        import jax

        missing = sorted(set(loaded.params) - set(shardings))
        if missing:
            raise ValueError(f"shardings: no sharding given for {', '.join(missing[:5])}")
        for name in list(loaded.params):
            loaded.params[name] = jax.device_put(loaded.params[name], shardings[name])
    return loaded
