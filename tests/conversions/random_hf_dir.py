"""Random-weight HF safetensors checkpoints of any registered family, written without torch.

Tensor names and layouts come from the family's HF name map (the inverse of what the
loader reads), so this exercises the loaders on any shape quickly, including shapes far too
big to build through transformers (the load benchmark's 1B-shaped checkpoint). Written in
shards of at most `max_shard_bytes`, with an index file when there is more than one.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxllm.config import ModelConfig
from jaxllm.models.registry import family_for
from jaxllm.models.stacked_names import slot_name

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def source_tensors(cfg: ModelConfig):
    """(HF name, stored shape, jaxllm name) of every tensor of a checkpoint of `cfg`."""
    family = family_for(cfg.architecture)
    names = (family.hf_names_for(cfg.architecture) if hasattr(family, "hf_names_for")
             else family.hf_names)  # a family whose map reads several architectures' names
    for name, shape in family.param_shapes(cfg).items():
        try:  # stacked parameters (experts) have one source tensor per slot
            stacked = names.to_source(slot_name(name, 0)) != names.to_source(name)
        except KeyError:
            stacked = False
        params = [slot_name(name, j) for j in range(shape[0])] if stacked else [name]
        one = shape[1:] if stacked else shape
        for n in params:
            source = names.to_source(n)
            _, transpose = names.to_jaxllm(source)
            yield source, tuple(one[::-1] if transpose else one), n


def write_random_hf_dir(path: str | Path, cfg: ModelConfig, seed: int, dtype: str = "float32",
                        max_shard_bytes: int = 1 << 30) -> Path:
    """Write config.json and random safetensors for `cfg` to `path`; returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = family_for(cfg.architecture).config_to_hf(cfg)
    hf["torch_dtype"] = hf["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for source, shape, name in source_tensors(cfg):
        if name.endswith(".scale"):
            a = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])
            if "router" in name:
                a *= 8  # decisive routing
        a = a.astype(_DTYPES[dtype])
        if size and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][source] = a
        size += a.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname))
        weight_map.update({k: fname for k in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path
