"""Sharding entry point named in the design: re-exports jaxllm.parallel (see its modules)."""

from jaxllm.parallel import *  # noqa: F403
from jaxllm.parallel import __all__  # noqa: F401
