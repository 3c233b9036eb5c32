"""jaxllm: an LLM inference engine on JAX/XLA.

    from jaxllm import LLM, SamplingParams
    llm = LLM()  # the embedded default model (SmolLM2-135M-Instruct)
    print(llm.generate("Hello", SamplingParams(max_tokens=16))[0].outputs[0].text)
"""

from pathlib import Path as _Path

# In a source checkout, kernels/, server/ and conversions/ sit beside this package and are
# installed as jaxllm.kernels / jaxllm.server / jaxllm.conversions (setuptools package-dir).
# Running from the repository root imports this directory first, so extend the package path
# to find them there too.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821
del _Path, _root

from jaxllm.config import EngineConfig  # noqa: E402
from jaxllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from jaxllm.sampling_params import RequestOutputKind, SamplingParams  # noqa: E402
from jaxllm.structured.spec import StructuredOutputsParams  # noqa: E402


def __getattr__(name: str):
    # LLM pulls in the whole engine (jax, flax); import it only when asked for.
    if name == "LLM":
        from jaxllm.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from jaxllm.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")


__all__ = ["LLM", "AsyncEngine", "CompletionOutput", "EngineConfig", "RequestOutput",
           "RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]
