"""Hugging Face checkpoint directories (config.json + safetensors) -> flat jaxllm params.

Every tensor is mapped through its architecture family's HF name table and checked against
the family's parameter shapes before any is read, so a missing or misshapen tensor fails
fast with its HF name and file; then tensors are read one at a time through the
`safetensors` library, transposed from PyTorch's [out, in] to [in, out] and cast.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import ModelConfig
from jaxllm.conversions.common import LoadedCheckpoint
from jaxllm.conversions.safetensors_reader import SafetensorsFile
from jaxllm.models.dtypes import resolve_param_dtype
from jaxllm.models.params import check_params
from jaxllm.models.registry import family_for
from jaxllm.models.stacked_names import stacked_slot

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Safetensors dtype codes we load as weights -> numpy dtype names.
_FLOAT_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Buffers some older checkpoints saved that carry no learned information.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def open_files(path: Path) -> dict[str, SafetensorsFile]:
    """HF tensor name -> the open file holding it (single file or sharded via the index).

    On error, files opened so far are closed; on success the caller closes them (see
    `close_all`).
    """
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX_FILE}: not a valid safetensors index ({e})") from e
        files: dict[str, SafetensorsFile] = {}
        by_name: dict[str, SafetensorsFile] = {}
        try:
            for name, fname in weight_map.items():
                if fname not in files:
                    files[fname] = SafetensorsFile(path / fname)
                if name not in files[fname]:
                    raise ValueError(f"{path / INDEX_FILE}: tensor {name} is listed in {fname} "
                                     f"but that file does not contain it")
                by_name[name] = files[fname]
        except BaseException:
            close_all(files.values())
            raise
        return by_name
    if (path / SINGLE_FILE).is_file():
        f = SafetensorsFile(path / SINGLE_FILE)
        return {name: f for name in f.keys()}
    if any(path.glob("*.bin")) or any(path.glob("*.pth")):
        raise ValueError(f"{path}: only safetensors checkpoints are supported (found PyTorch "
                         f".bin/.pth files; re-save with save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def close_all(files: Iterable[SafetensorsFile]) -> None:
    for f in {id(f): f for f in files}.values():
        f.close()


def checkpoint_dtype(cfg: ModelConfig, files: dict[str, SafetensorsFile]) -> str:
    """The dtype the weights are stored in (the embedding's), falling back to config.json."""
    name = "model.embed_tokens.weight"
    if name in files:
        stored = _FLOAT_CODES.get(files[name].dtype_code(name))
        if stored in ("float32", "float16", "bfloat16"):
            return stored
    return cfg.torch_dtype


def load_hf_dir(path: str | Path, dtype: str = "auto", progress: bool = False) -> LoadedCheckpoint:
    """Load an HF checkpoint directory. See `jaxllm.conversions.load_checkpoint`."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    cfg = ModelConfig.from_hf_dict(hf_config)
    files = open_files(path)
    try:
        params = _read_params(path, cfg, files, dtype, progress)
    finally:
        close_all(files.values())
    check_params(cfg, params, str(path))

    gen_path = path / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return LoadedCheckpoint(config=cfg, params=params, generation_config=generation_config,
                            tokenizer_path=path, source_format="hf", hf_config=hf_config)


def plan_params(path: Path, cfg: ModelConfig,
                files: dict[str, SafetensorsFile]) -> list[tuple[str, str, bool]]:
    """(HF name, jaxllm name, transpose?) of every weight, each name, shape and dtype checked
    against `cfg` and none missing. A jaxllm name `p[i]` is slot i of stacked parameter p."""
    family = family_for(cfg.architecture)
    expected = family.param_shapes(cfg)
    plan: list[tuple[str, str, bool]] = []
    for hf_name, f in files.items():
        mapped = family.hf_names.to_jaxllm(hf_name)
        if mapped is None:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            raise ValueError(f"{f.path}: unrecognized tensor {hf_name} for {cfg.architecture}")
        name, transpose = mapped
        if name == "lm_head.kernel" and cfg.tie_word_embeddings:
            logger.debug("dropping %s: embeddings are tied", hf_name)
            continue
        base, slot = stacked_slot(name)  # slot: this tensor is one row of a stacked param
        if base not in expected or (slot is not None and slot >= expected[base][0]):
            raise ValueError(f"{f.path}: unexpected tensor {hf_name} (config.json does not "
                             f"enable it for {cfg.architecture})")
        shape = expected[base] if slot is None else expected[base][1:]
        want = shape[::-1] if transpose else shape
        if f.shape(hf_name) != want:
            raise ValueError(f"{f.path}: tensor {hf_name} has shape {f.shape(hf_name)}, "
                             f"expected {want} from config.json")
        if f.dtype_code(hf_name) not in _FLOAT_CODES:
            raise ValueError(f"{f.path}: tensor {hf_name} has non-float dtype "
                             f"{f.dtype_code(hf_name)}")
        plan.append((hf_name, name, transpose))
    read = {name for _, name, _ in plan}
    missing = sorted(n for n in expected if n not in read and not (
        len(expected[n]) > 1 and all(f"{n}[{i}]" in read for i in range(expected[n][0]))))
    if missing:
        shown = ", ".join(family.hf_names.to_source(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{path}: missing tensor(s) {shown}{more}")
    return plan


def _read_params(path: Path, cfg: ModelConfig, files: dict[str, SafetensorsFile], dtype: str,
                 progress: bool) -> dict[str, np.ndarray]:
    """Validate every tensor's name, shape and dtype against `cfg`, then read them one by one."""
    plan = plan_params(path, cfg, files)
    expected = family_for(cfg.architecture).param_shapes(cfg)
    ckpt_dtype = checkpoint_dtype(cfg, files)
    out_dtype = resolve_param_dtype(dtype, ckpt_dtype)
    params: dict[str, np.ndarray] = {}
    for hf_name, name, transpose in tqdm(plan, desc="loading", unit="tensor", disable=not progress):
        a = files[hf_name].get(hf_name)  # a fresh array; cast/transpose copy at most once more
        base, slot = stacked_slot(name)
        if slot is None:
            params[name] = np.ascontiguousarray(a.T if transpose else a, dtype=out_dtype)
        else:
            if base not in params:
                params[base] = np.empty(expected[base], out_dtype)
            params[base][slot] = a.T if transpose else a
    return params
