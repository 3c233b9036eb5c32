"""Checkpoint loading (HF safetensors, GGUF, jaxllm orbax) and conversion to orbax.

`load_checkpoint(path)` returns a `LoadedCheckpoint` (config, flat params, generation config,
tokenizer path); `save_checkpoint` writes a complete jaxllm model directory;
`python -m jaxllm.conversions SOURCE DEST` converts (see `cli.main`).
"""

from jaxllm.conversions.checkpoint import detect_format, load_checkpoint
from jaxllm.conversions.common import LoadedCheckpoint
from jaxllm.conversions.orbax_io import save_checkpoint


def main(argv: list[str] | None = None) -> int:
    """The conversion CLI (`python -m jaxllm.conversions`); returns the exit code."""
    from jaxllm.conversions.cli import main as cli_main

    return cli_main(argv)


__all__ = ["LoadedCheckpoint", "detect_format", "load_checkpoint", "main", "save_checkpoint"]
