"""jaxllm model directories: an orbax checkpoint of the flat params plus the side files.

Layout of a converted directory (it alone is a complete model):
    params/                  orbax PyTree checkpoint (names split on "." into nested dicts)
    jaxllm_config.json       {"format", "format_version", "model_config": ModelConfig.to_dict(),
                              "param_dtype", "source"} -- the exact config, read back first
    config.json              HF-style config (ModelConfig.from_file reads it; so do other tools)
    generation_config.json   generation defaults ({} when the source had none)
    tokenizer.json, tokenizer_config.json, ...   written by jaxllm.tokenizer.Tokenizer.save
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.conversions.common import LoadedCheckpoint
from jaxllm.models.dtypes import dtype_name, resolve_param_dtype
from jaxllm.models.params import check_params
from jaxllm.models.registry import family_for

logger = logging.getLogger(__name__)

FORMAT = "jaxllm-orbax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
JAXLLM_CONFIG = "jaxllm_config.json"


def is_jaxllm_dir(path: Path) -> bool:
    return path.is_dir() and (path / JAXLLM_CONFIG).is_file()


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"layers.0.q_proj.kernel": a} -> {"layers": {"0": {"q_proj": {"kernel": a}}}}."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of `nest`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def model_config_to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """An HF-style config.json dict that `ModelConfig.from_hf_dict` reads back to `cfg`
    (written by the family of cfg's architecture)."""
    return family_for(cfg.architecture).config_to_hf(cfg)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_checkpoint(
    dest: str | Path,
    config: ModelConfig,
    params: Mapping[str, np.ndarray],
    *,
    generation_config: Mapping[str, Any] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    tokenizer_source: str | Path | None = None,
    source: str = "",
) -> Path:
    """Write a complete jaxllm model directory at `dest` (created; must not hold params/ yet).

    `params` is the flat dict (one dtype). `hf_config` is the source's config.json, kept for
    its extra fields (its dtype entry is updated); None synthesizes one from `config`.
    `tokenizer_source` is anything `jaxllm.tokenizer.load_tokenizer` accepts; a directory
    without tokenizer files is skipped with a warning.
    """
    import jax
    import orbax.checkpoint as ocp

    dest = Path(dest).resolve()
    check_params(config, dict(params), "save_checkpoint")
    dtypes = {np.dtype(a.dtype) for a in params.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_checkpoint: params must share one dtype, got {sorted(map(str, dtypes))}")
    saved_dtype = dtype_name(dtypes.pop())
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / PARAMS_DIR).exists():
        raise ValueError(f"{dest / PARAMS_DIR} already exists")

    _save_tokenizer(tokenizer_source, dest)
    # Orbax deep-copies host arrays before writing (a guard for async saves); this save is
    # synchronous and the arrays are ours, so skip the copy that would double peak memory.
    no_copy = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=no_copy)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(dest / PARAMS_DIR, args=ocp.args.PyTreeSave(nest(params)))

    saved_cfg = ModelConfig.from_dict({**config.to_dict(), "torch_dtype": saved_dtype})
    hf = dict(hf_config) if hf_config else model_config_to_hf_dict(saved_cfg)
    hf["dtype"] = hf["torch_dtype"] = saved_dtype
    _write_json(dest / "config.json", hf)
    _write_json(dest / "generation_config.json", dict(generation_config or {}))
    _write_json(dest / JAXLLM_CONFIG, {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_config": saved_cfg.to_dict(), "param_dtype": saved_dtype, "source": source,
    })
    return dest


def _save_tokenizer(source: str | Path | None, dest: Path) -> None:
    if source is None:
        return
    source = Path(source)
    if source.is_dir() and not (source / "tokenizer.json").is_file():
        logger.warning("%s has no tokenizer.json; the converted model has no tokenizer", source)
        return
    from jaxllm.tokenizer import load_tokenizer

    load_tokenizer(source).save(dest)


def read_jaxllm_config(path: Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, saved param dtype) of a jaxllm model directory."""
    meta_path = path / JAXLLM_CONFIG
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format_version {meta['format_version']} is newer than this "
                             f"jaxllm understands ({FORMAT_VERSION})")
        return ModelConfig.from_dict(meta["model_config"]), str(meta["param_dtype"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: not a valid jaxllm config ({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"{meta_path}: {e}") from e


def restore_params(
    path: str | Path,
    config: ModelConfig,
    dtype: Any,
    shardings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore the flat params of a jaxllm directory, cast to `dtype` (a numpy dtype).

    With `shardings` ({name: jax.sharding.Sharding}, every param) orbax restores each array
    straight into its sharding (jax.Array); without, numpy arrays on the host.
    """
    import orbax.checkpoint as ocp

    params_dir = Path(path).resolve() / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{path}: no orbax checkpoint at {params_dir}")
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            stored = flatten(ckptr.metadata(params_dir).item_metadata.tree)
        except Exception as e:  # orbax raises assorted errors on damaged directories
            raise ValueError(f"{params_dir}: unreadable orbax checkpoint ({e})") from e
        check_params(config, stored, str(params_dir))
        if shardings is not None:
            missing = sorted(set(stored) - set(shardings))
            if missing:
                raise ValueError(f"shardings: no sharding given for {', '.join(missing[:5])}")
            args = {n: ocp.ArrayRestoreArgs(sharding=shardings[n], dtype=dtype) for n in stored}
        else:
            args = {n: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype) for n in stored}
        try:
            tree = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=nest(args)))
        except Exception as e:
            raise ValueError(f"{params_dir}: failed to restore orbax checkpoint ({e})") from e
    return flatten(tree)


def load_jaxllm_dir(
    path: str | Path, dtype: str = "auto", shardings: Mapping[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Load a converted jaxllm directory. See `jaxllm.conversions.load_checkpoint`."""
    path = Path(path)
    cfg, saved_dtype = read_jaxllm_config(path)
    out_dtype = resolve_param_dtype(dtype, saved_dtype)
    params = restore_params(path, cfg, out_dtype, shardings)
    check_params(cfg, params, str(path))
    gen_path = path / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    hf_path = path / "config.json"
    hf_config = json.loads(hf_path.read_text()) if hf_path.is_file() else {}
    return LoadedCheckpoint(config=cfg, params=params, generation_config=generation_config,
                            tokenizer_path=path, source_format="jaxllm", hf_config=hf_config)
