"""Everything the engine needs before it can run: model, tokenizer and resolved sizes.

Kept apart from the engine so the loop reads as scheduling and stepping only. Tensor parallel
placement happens here. An HF safetensors checkpoint is read straight into its shards: each
parameter's slices are read from the file as the named rules place them (each process only
what its devices own; jaxllm.conversions.sharded_hf). Otherwise (GGUF, jaxllm directories,
heads that must be padded to fit the tensor-parallel size, data parallel) the checkpoint is
read once to host memory, heads are padded (jaxllm.parallel.head_padding) and each parameter
is placed on its slice of the mesh by the same rules; and the engine gets the KV-cache sharding
and the shard_map attention wrapper through `EngineParts`. Data parallel builds one
`EngineParts` per data slice of the mesh from the same host copy (`load_engine_parts_per_slice`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.models import CausalLM, build_model
from jaxllm.models.dtypes import resolve_compute_dtype
from jaxllm.models.quantized_layers import QuantizedMatmulOptions
from jaxllm.parallel import (
    MODEL_AXIS,
    bind_mesh,
    data_slice_meshes,
    flat_param_shardings,
    kv_cache_sharding,
    make_mesh,
    model_shardings,
    pad_heads_for_tp,
    place_array,
    plan_head_layout,
    shard_attention,
)
from jaxllm.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class EngineParts:
    """What one engine runs on. `model_config` is the config of the model as built: under
    tensor parallelism its head counts are the padded ones (the KV cache is sized from it)."""

    model_config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer
    generation_config: dict[str, Any]
    default_name: str
    max_model_len: int
    page_size: int
    dtype: jnp.dtype
    kv_dtype: jnp.dtype  # the KV cache's (EngineConfig.kv_cache_dtype; "auto": the model's)
    kv_sharding: Any = None
    attention_wrapper: Callable | None = None
    mesh: Mesh | None = None  # None: single device, no sharding machinery at all
    # Builds the ModelRunner (same signature as ModelRunner); None: ModelRunner itself.
    # Multi-host leaders use it to broadcast each step's inputs (jaxllm.multihost).
    make_runner: Callable | None = None


def resolve_model_path(model: str | None) -> Path:
    """The given local path; else a hub id `org/name[@revision]`'s snapshot directory
    (jaxllm.hub: downloaded, or found in the hub cache); None: the embedded default model."""
    if model is None:
        from jaxllm.default_model import default_model_path

        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from jaxllm.hub import download_model, parse_hub_id

    hub_id = parse_hub_id(model)
    if hub_id is not None:
        return download_model(hub_id)
    raise FileNotFoundError(f"model path {path} does not exist (pass a local HF directory, a "
                            "jaxllm directory, a .gguf file or a hub id org/name[@revision])")


def engine_mesh(config: EngineConfig) -> Mesh | None:
    """The [data, model] mesh the config asks for; None for one device in one process.

    In one process, the first tp * dp devices are used (more may exist, e.g. simulated
    CPU devices). Across processes every device must be in the mesh: a process without a
    device in it would have nothing to run.
    """
    tp, dp = config.tensor_parallel_size, config.data_parallel_size
    if tp * dp == 1 and config.num_processes == 1:
        return None
    devices = jax.devices()
    want = tp * dp
    if config.num_processes > 1 or jax.process_count() > 1:
        if len(devices) != want:
            raise ValueError(
                f"tensor_parallel_size={tp} x data_parallel_size={dp} = {want} must equal the "
                f"{len(devices)} devices of all {jax.process_count()} processes")
    elif len(devices) < want:
        raise ValueError(
            f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {want} devices, but "
            f"only {len(devices)} {jax.default_backend()} device(s) are available")
    elif len(devices) > want:
        logger.info("using %d of %d devices for tp=%d x dp=%d", want, len(devices), tp, dp)
    return make_mesh(tp, dp, devices[:want])


@dataclass
class _HostModel:
    """A checkpoint read to host memory, heads padded for the tensor-parallel size."""

    config: ModelConfig
    params: dict[str, np.ndarray]
    tokenizer: Tokenizer
    generation_config: dict[str, Any]
    name: str
    dtype: jnp.dtype
    placed: bool = False  # params are jax Arrays already where the engine runs them


def _enable_compilation_cache(config: EngineConfig) -> None:
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def keep_gguf_blocks(config: EngineConfig, path: Path) -> bool:
    """Whether to keep a GGUF checkpoint's quantization blocks (config.quantization).

    "auto" keeps them when the native kernel serves them: a .gguf file, CPU, one device in one
    process, float32 (the blocks compute in float32; sharding rules know dense kernels only).
    "gguf" insists and names what stands in the way.
    """
    from jaxllm.conversions.gguf_loader import is_gguf_file

    if config.quantization == "none":
        return False
    obstacles = []
    if not is_gguf_file(path):
        obstacles.append(f"{path} is not a .gguf file")
    if config.tensor_parallel_size * config.data_parallel_size > 1 or config.num_processes > 1:
        obstacles.append("the model is sharded (tensor/data parallel or several processes)")
    if config.dtype == "bfloat16":
        obstacles.append("dtype bfloat16 was asked for (blocks compute in float32)")
    if config.quantization == "gguf":
        if obstacles:
            raise ValueError(f"quantization='gguf' cannot keep quantization blocks: "
                             f"{'; '.join(obstacles)}")
        return True
    from jaxllm.kernels.quantized_matmul import default_impl

    return not obstacles and jax.default_backend() == "cpu" and default_impl() == "native"


def _load_host_model(config: EngineConfig) -> _HostModel:
    from jaxllm.conversions import load_checkpoint

    path = resolve_model_path(config.model)
    keep_blocks = keep_gguf_blocks(config, path)
    ckpt = load_checkpoint(path, dtype="float32" if keep_blocks else config.dtype,
                           keep_blocks=keep_blocks)
    dtype = resolve_compute_dtype(config.dtype, ckpt.config.torch_dtype)
    if keep_blocks:
        logger.info("GGUF weights kept in quantization blocks (quantized matmul, %s activations)",
                    config.quantized_activations)
        dtype = jnp.dtype(jnp.float32)
    tokenizer = load_tokenizer(ckpt.tokenizer_path or path)
    cfg, params = ckpt.config, ckpt.params
    if config.tensor_parallel_size > 1:
        padded, params = pad_heads_for_tp(cfg, params, config.tensor_parallel_size)
        if (padded.num_heads, padded.num_kv_heads) != (cfg.num_heads, cfg.num_kv_heads):
            logger.info("heads %d q / %d kv rearranged to %d q / %d kv for tensor_parallel_size=%d",
                        cfg.num_heads, cfg.num_kv_heads, padded.num_heads, padded.num_kv_heads,
                        config.tensor_parallel_size)
        cfg = padded
    name = path.stem if path.is_file() else path.name
    return _HostModel(cfg, params, tokenizer, dict(ckpt.generation_config), name, dtype)


def lazy_loadable(config: EngineConfig, path: Path, mesh: Mesh | None) -> bool:
    """Whether the checkpoint can be read straight into its shards (_load_placed_model): an HF
    safetensors directory whose attention heads need no rearranging for the mesh."""
    from jaxllm.conversions.checkpoint import detect_format

    if detect_format(path) != "hf" or config.quantization == "gguf":
        return False  # (the host path says why quantization="gguf" cannot apply)
    if mesh is None:
        return True
    cfg = ModelConfig.from_file(path)
    return plan_head_layout(cfg.num_heads, cfg.num_kv_heads, mesh.shape[MODEL_AXIS]).is_identity


def _load_placed_model(config: EngineConfig, path: Path, mesh: Mesh | None) -> _HostModel:
    """The HF checkpoint at `path` read tensor slice by tensor slice into its place on `mesh`
    (one device when None): host memory holds about one tensor, never the checkpoint
    (jaxllm.conversions.sharded_hf)."""
    from jaxllm.conversions.sharded_hf import load_hf_dir_into

    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])

        def sharding_for(name: str, shape: tuple[int, ...]) -> Any:
            return device
    else:
        def sharding_for(name: str, shape: tuple[int, ...]) -> Any:
            return flat_param_shardings({name: shape}, mesh)[name]

    ckpt = load_hf_dir_into(path, sharding_for, config.dtype)
    dtype = resolve_compute_dtype(config.dtype, ckpt.config.torch_dtype)
    tokenizer = load_tokenizer(ckpt.tokenizer_path or path)
    return _HostModel(ckpt.config, ckpt.params, tokenizer, dict(ckpt.generation_config),
                      path.name, dtype, placed=True)


def _load_model_for(config: EngineConfig, mesh: Mesh | None) -> _HostModel:
    """One engine's checkpoint: straight into shards when it can be, else via host memory."""
    path = resolve_model_path(config.model)
    if lazy_loadable(config, path, mesh):
        return _load_placed_model(config, path, mesh)
    return _load_host_model(config)


def _parts_on(config: EngineConfig, host: _HostModel, mesh: Mesh | None) -> EngineParts:
    """Build the model (placed on `mesh` when given) and the engine's hooks for it."""
    cfg = host.config
    max_len = config.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if max_len > cfg.max_position_embeddings:
        logger.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                       max_len, cfg.max_position_embeddings)
    rope_positions = max(max_len, cfg.max_position_embeddings)  # the model's cos/sin table
    backend = jax.default_backend()
    page_size = config.page_size or (16 if backend == "cpu" else 64)
    kv_sharding = attention_wrapper = None
    if mesh is None:
        model = build_model(cfg, host.params, host.dtype,
                            QuantizedMatmulOptions(precision=config.quantized_activations),
                            max_positions=rope_positions)
    else:
        # Each parameter goes straight to its slices (no full copy on one device first).
        placed = host.params
        if not host.placed:
            shardings = flat_param_shardings({k: v.shape for k, v in host.params.items()}, mesh)
            placed = {k: place_array(v, shardings[k]) for k, v in host.params.items()}
        model = _place_remaining(
            build_model(cfg, placed, host.dtype, max_positions=rope_positions), mesh)
        bind_mesh(model, mesh)  # mixture-of-experts blocks run expert-parallel on it
        kv_sharding = _without_trailing_none(kv_cache_sharding(mesh))
        attention_wrapper = _AttentionWrapper(mesh)
    return EngineParts(model_config=cfg, model=model, tokenizer=host.tokenizer,
                       generation_config=dict(host.generation_config), default_name=host.name,
                       max_model_len=max_len, page_size=page_size, dtype=host.dtype,
                       kv_dtype=(host.dtype if config.kv_cache_dtype == "auto"
                                 else jnp.dtype(config.kv_cache_dtype)),
                       kv_sharding=kv_sharding, attention_wrapper=attention_wrapper, mesh=mesh)


def _place_remaining(model: CausalLM, mesh: Mesh) -> CausalLM:
    """shard_model for what is not yet where the rules want it (buffers such as rope
    frequencies); arrays already placed are kept: across processes they cannot be read back."""
    state = nnx.state(model)
    targets = model_shardings(model, mesh)

    def place(value: Any, target: NamedSharding) -> Any:
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(target, value.ndim):
            return value
        return place_array(value, target)

    nnx.update(model, jax.tree.map(place, state, targets))
    return model


def _without_trailing_none(sharding: NamedSharding) -> NamedSharding:
    """The same sharding spelled as jit spells its outputs (P(None, None, 'model'), not
    P(None, None, 'model', None)): the step donates the caches and gets them back, and an
    input sharding that merely compares unequal would compile every bucket a second time."""
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


@dataclass(frozen=True)
class _AttentionWrapper:
    """attention fn -> the same fn run per `model` shard on its local heads (shard_map)."""

    mesh: Mesh

    def __call__(self, attn_fn: Callable) -> Callable:
        return shard_attention(attn_fn, self.mesh)


def load_engine_parts(config: EngineConfig, mesh: Mesh | None = None) -> EngineParts:
    """Parts of one engine: on `mesh` if given, else on the mesh the config asks for.

    A config with data_parallel_size > 1 needs one engine per data slice: use
    `load_engine_parts_per_slice` (the data-parallel engine does).
    """
    _enable_compilation_cache(config)
    if mesh is None:
        if config.data_parallel_size > 1:
            raise ValueError(
                "data_parallel_size > 1 runs one engine per data slice, which is a serving "
                "feature: use jaxllm.dp_engine.create_async_engine (or the server); "
                "an offline LLM runs one engine (data_parallel_size=1)")
        mesh = engine_mesh(config)
    return _parts_on(config, _load_model_for(config, mesh), mesh)


def load_engine_parts_per_slice(config: EngineConfig) -> list[EngineParts]:
    """One `EngineParts` per data slice of the config's mesh; the checkpoint is read once."""
    _enable_compilation_cache(config)
    host = _load_host_model(config)
    mesh = engine_mesh(config)
    if mesh is None:
        return [_parts_on(config, host, None)]
    return [_parts_on(config, host, sub) for sub in data_slice_meshes(mesh)]
