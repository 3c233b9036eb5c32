"""Matmul precision by model dtype, scoped to jaxllm's own programs.

XLA on GPU runs float32 dots as TF32 by default and TPU as bfloat16 passes, so a float32
model's logits there sit ~3e-4 from transformers' (the first H200 run, benchmarks/RESULTS.md).
A float32 model asks for float32 because it wants exact arithmetic: its programs are traced
under `jax.default_matmul_precision("highest")`. A bfloat16 model keeps the backend's fast
default. The setting is a context manager around jaxllm's tracing (never a global config
update), so a user's own JAX code in the same process keeps whatever precision it chose.

JAX keys its jit cache on this setting: a jitted function traced inside the context and then
called outside it is traced again at the default precision. Wrap every call of such a function
(`with_matmul_precision`), or call the compiled (AOT) program, which carries its precision.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

F = TypeVar("F", bound=Callable[..., Any])

# What a float32 model's dots are traced with; None leaves the backend's default.
FLOAT32_PRECISION = "highest"


def matmul_precision_name(dtype: Any) -> str | None:
    """The precision a model of `dtype` traces its dots with: "highest" for float32, None
    (the backend's default, bf16 passes on TPU / TF32 off for bf16 inputs on GPU) otherwise."""
    return FLOAT32_PRECISION if jnp.dtype(dtype) == jnp.float32 else None


@contextlib.contextmanager
def matmul_precision_for(dtype: Any) -> Iterator[None]:
    """Trace inside this block with the matmul precision `dtype` calls for (see module doc)."""
    name = matmul_precision_name(dtype)
    if name is None:
        yield
        return
    with jax.default_matmul_precision(name):
        yield


def with_matmul_precision(fn: F, dtype: Any) -> F:
    """`fn` (typically a jitted function) called inside `matmul_precision_for(dtype)` every
    time, so its traces, lowerings and cache look-ups all see the same precision."""
    if matmul_precision_name(dtype) is None:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with matmul_precision_for(dtype):
            return fn(*args, **kwargs)

    for name in ("lower", "trace"):  # jax.jit's AOT entry points, scoped the same way
        method = getattr(fn, name, None)
        if method is not None:
            setattr(call, name, with_matmul_precision(method, dtype))
    return call  # type: ignore[return-value]
