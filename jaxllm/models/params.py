"""The flat parameter naming shared by the models and every loader.

Loaders (HF safetensors, GGUF, orbax) produce `{name: array}` in this naming and layout; the
model of the config's architecture consumes it. Linear kernels are stored `[in, out]` (the
transpose of PyTorch's `[out, in]`). Each name also carries logical axis names, which the
sharding rules map onto a device mesh. Which names exist, their shapes and their axes are
the architecture family's (`jaxllm.models.registry`); these functions look them up.
"""

from __future__ import annotations

from jaxllm.config import ModelConfig


def logical_axes(name: str, architecture: str | None = None) -> tuple[str, ...]:
    """Logical axis names of the parameter called `name` (e.g. "layers.3.q_proj.kernel").

    With `architecture`, its family's table; without, the first registered family that
    knows the parameter kind (families agree on the names they share).
    """
    from jaxllm.models.registry import FAMILIES, family_for

    families = (family_for(architecture),) if architecture is not None else FAMILIES
    for family in families:
        axes = family.logical_axes(name)
        if axes is not None:
            return axes
    raise KeyError(f"no logical axes known for parameter {name!r}")


def expected_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the model needs, with its shape. Loaders check against this."""
    from jaxllm.models.registry import family_for

    return family_for(cfg.architecture).param_shapes(cfg)


def check_params(cfg: ModelConfig, params: dict, source: str) -> None:
    """Raise a ValueError naming the first missing, unexpected or misshapen tensor."""
    expected = expected_param_shapes(cfg)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    for name, shape in expected.items():
        got = tuple(params[name].shape)
        if got != shape:
            raise ValueError(f"{source}: tensor {name} has shape {got}, expected {shape}")
