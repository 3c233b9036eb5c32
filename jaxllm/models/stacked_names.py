"""Parameters stacked from many checkpoint tensors: `name[i]` is slot i of parameter `name`.

Checkpoints store each expert of a mixture-of-experts layer as its own tensor
(`model.layers.3.mlp.experts.5.gate_proj.weight`); jaxllm holds one stacked array per layer
(`layers.3.experts.gate_kernel`, [experts, in, out]) so experts shard along their first axis
and run as one grouped matmul. A family's tensor-name map names such a source tensor
`layers.3.experts.gate_kernel[5]`; loaders place it at index 5 of the stacked parameter.
"""

from __future__ import annotations

import re

_SLOT = re.compile(r"^(.*)\[(\d+)\]$")


def stacked_slot(name: str) -> tuple[str, int | None]:
    """(parameter name, slot index) of `name[i]`; (name, None) for an ordinary name."""
    m = _SLOT.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def slot_name(name: str, index: int) -> str:
    """The name of slot `index` of stacked parameter `name`."""
    return f"{name}[{index}]"
