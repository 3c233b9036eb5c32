"""The dtype policy: which dtype parameters are loaded in and the model computes in.

One rule decides "auto" everywhere (loaders, the model builder, the engine): `auto_dtype_name`.
On CPU it is float32 (XLA CPU is slow and inexact in bfloat16 matvecs); on accelerators a
16-bit checkpoint runs in bfloat16 and anything else in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# Requested parameter dtypes. "checkpoint" keeps the checkpoint's own dtype (what conversion
# wants: nothing is lost); "auto" is the runtime policy (auto_dtype_name).
DTYPE_CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
# Dtypes a model computes in.
COMPUTE_DTYPE_CHOICES = ("auto", "float32", "bfloat16")

_NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def normalize_dtype_name(name: str) -> str:
    """'torch.bfloat16' / 'bf16' / 'float' -> 'bfloat16' / 'float32'; unknown -> ValueError."""
    n = str(name).lower().removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "f32": "float32", "f16": "float16"}
    n = aliases.get(n, n)
    if n not in _NP_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(_NP_DTYPES)}")
    return n


def dtype_name(dtype: np.dtype) -> str:
    """The policy's name of a parameter dtype ("float32", "bfloat16", "float16")."""
    for name, d in _NP_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported parameter dtype {dtype}")


def auto_dtype_name(checkpoint_dtype: str, backend: str | None = None) -> str:
    """What "auto" means for a checkpoint stored in `checkpoint_dtype` on `backend`
    (default: JAX's default backend)."""
    if (backend or jax.default_backend()) == "cpu":
        return "float32"
    try:
        stored = normalize_dtype_name(checkpoint_dtype)
    except ValueError:  # e.g. float64: not a 16-bit checkpoint
        return "float32"
    return "bfloat16" if stored in ("bfloat16", "float16") else "float32"


def resolve_param_dtype(requested: str, checkpoint_dtype: str) -> np.dtype:
    """The numpy dtype loaders return parameters in (requested: one of DTYPE_CHOICES)."""
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested == "auto":
        requested = auto_dtype_name(checkpoint_dtype)
    elif requested == "checkpoint":
        requested = checkpoint_dtype
    return _NP_DTYPES[normalize_dtype_name(requested)]


def resolve_compute_dtype(requested: str | jnp.dtype, checkpoint_dtype: str = "float32",
                          ) -> jnp.dtype:
    """The dtype a model computes in (requested: one of COMPUTE_DTYPE_CHOICES or a dtype)."""
    if not isinstance(requested, str):
        return jnp.dtype(requested)
    if requested not in COMPUTE_DTYPE_CHOICES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {requested!r}")
    if requested == "auto":
        requested = auto_dtype_name(checkpoint_dtype)
    return jnp.dtype(requested)
