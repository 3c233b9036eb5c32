"""Ragged paged attention for jaxllm: one call per layer serves prefill chunks and decode alike.

    out, kv_cache = ragged_paged_attention(
        q, k_new, v_new, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs,
        *, sm_scale, sliding_window=None, soft_cap=None, impl=None)

or, with the step's tables in one pytree (what the runner passes across jit):

    md = AttentionMetadata(kv_lens=..., page_indices=..., cu_q_lens=..., num_seqs=...)
    out, kv_cache = ragged_paged_attention_from_metadata(q, k_new, v_new, kv_cache, md, *, ...)

Shapes: q [T, Hq, D]; k_new, v_new [T, Hkv, D]; kv_cache [num_pages, page_size, 2*Hkv, D] with
K of kv-head h at index 2h and V at 2h+1; kv_lens [S]; page_indices [S, P] (any P >= pages in
use); cu_q_lens [S+1]; num_seqs [1] or scalar; all int32. Token j of sequence s sits at position
kv_lens[s] - q_len[s] + j, is written to page page_indices[s, pos // page_size], slot
pos % page_size, and attends causally to positions <= pos of its own sequence (within
(pos - sliding_window, pos] when a window is set); soft_cap c maps logits to c*tanh(logits/c).
Dtypes: float32 or bfloat16; k_new/v_new must have kv_cache's dtype; math runs in float32.
Padding tokens and sequences write nothing and give zeros. The updated cache is returned
(donate it under jit so XLA updates in place).

With a backend (backends.py: one class per implementation, each declaring its platforms, its
KV-cache layout and a per-step metadata builder):

    backend = get_backend(impl)                      # None: the platform's default
    md = backend.prepare_metadata(md, num_tokens)    # once per step, inside the jitted step
    out, kv_cache = backend.attention_fn(q, k_new, v_new, kv_cache, md, sm_scale=...)

impl: None picks by platform (CPU: "cpu_native", or "cpu" without a C++ compiler; NVIDIA GPU:
"gpu", the Pallas Triton kernel; TPU: "tpu", JAX's own tuned ragged paged attention kernel);
"reference" | "cpu" | "cpu_native" | "tpu" | "tpu_own" | "gpu" force one, running the Pallas
kernels in interpret mode where they cannot compile. A backend's cache layout may pad the kv
heads and head_dim with zeros (kv_layout.py); every backend runs on any of these layouts.
"""

# Guard: run from a checkout's root, `import kernels` finds this folder (which is installed as
# jaxllm.kernels) instead of Hugging Face's `kernels` package, which transformers >= 5.25
# imports. Imported under that top-level name, hand over to the installed package; without one,
# to an empty stand-in that reads as no installation (no __file__, as transformers' availability
# check expects) and names the mix-up on use (tests/kernels/test_top_level_name.py).
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import types as _types

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec("kernels", [
        p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout])
    if _spec is not None:
        _sys.modules["kernels"] = _util.module_from_spec(_spec)  # what `import kernels` returns
        _spec.loader.exec_module(_sys.modules["kernels"])
    else:
        def _missing(name: str):
            raise AttributeError(f"Hugging Face's `kernels` package is not installed, so "
                                 f"kernels.{name} does not exist (this checkout's kernels/ "
                                 f"folder is jaxllm.kernels)", name=name)

        _sys.modules["kernels"] = _types.ModuleType("kernels", "stand-in: not installed")
        _sys.modules["kernels"].__file__, _sys.modules["kernels"].__path__ = None, []
        _sys.modules["kernels"].__getattr__ = _missing

from jaxllm.kernels.backends import AttentionBackend
from jaxllm.kernels.dispatch import (
    IMPLEMENTATIONS,
    default_impl,
    get_backend,
    ragged_paged_attention,
    ragged_paged_attention_from_metadata,
)
from jaxllm.kernels.kv_layout import KVCacheLayout
from jaxllm.kernels.metadata import AttentionMetadata
from jaxllm.kernels.reference import ragged_paged_attention_reference
from jaxllm.kernels.validation import validate_inputs

__all__ = [
    "IMPLEMENTATIONS",
    "AttentionBackend",
    "AttentionMetadata",
    "KVCacheLayout",
    "default_impl",
    "get_backend",
    "ragged_paged_attention",
    "ragged_paged_attention_from_metadata",
    "ragged_paged_attention_reference",
    "validate_inputs",
]
