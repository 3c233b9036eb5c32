"""jaxllm: an LLM inference engine on JAX/XLA."""

from pathlib import Path as _Path

# In a source checkout, kernels/, server/ and conversions/ sit beside this package and are
# installed as jaxllm.kernels / jaxllm.server / jaxllm.conversions (setuptools package-dir).
# Running from the repository root imports this directory first, so extend the package path
# to find them there too.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "kernels" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821
del _Path, _root
