"""`python -m jaxllm.conversions SOURCE DEST`: convert a HF directory or a .gguf file into a
complete jaxllm model directory (orbax params + config + generation config + tokenizer).

Peak memory is about one converted copy of the model: sources are memory-mapped and read
(dequantized, transposed, cast) one tensor at a time. DEST is written under a temporary
sibling name and renamed at the end, so an interrupted run never leaves a half model.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from jaxllm.conversions.checkpoint import detect_format, load_checkpoint
from jaxllm.conversions.orbax_io import save_checkpoint

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxllm.conversions",
        description="Convert a HF checkpoint directory or a .gguf file to a jaxllm (orbax) "
                    "model directory that --model accepts.")
    p.add_argument("source", help="HF checkpoint directory, .gguf file or jaxllm directory")
    p.add_argument("dest", help="output directory (must be absent or empty unless --force)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="parameter dtype to store; auto keeps the checkpoint's own dtype "
                        "(quantized GGUF weights become float32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    return p


def _check_dest(source: Path, dest: Path, force: bool) -> None:
    src, dst = source.resolve(), dest.resolve()
    if dst == src or dst in src.parents:
        raise ValueError(f"DEST {dest} would overwrite SOURCE {source}")
    if not dest.exists():
        return
    if dest.is_dir() and not any(dest.iterdir()):
        return
    if not force:
        raise FileExistsError(f"DEST {dest} exists and is not empty (use --force to replace it)")


def convert(source: str | Path, dest: str | Path, dtype: str = "auto", force: bool = False) -> Path:
    """Convert SOURCE into the jaxllm model directory DEST; returns DEST. See module doc."""
    source, dest = Path(source), Path(dest)
    fmt = detect_format(source)
    _check_dest(source, dest, force)
    start = time.perf_counter()
    loaded = load_checkpoint(source, "checkpoint" if dtype == "auto" else dtype, progress=True)
    logger.info("loaded %s checkpoint %s (%d tensors) in %.1fs", fmt, source,
                len(loaded.params), time.perf_counter() - start)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_checkpoint(tmp, loaded.config, loaded.params,
                        generation_config=loaded.generation_config, hf_config=loaded.hf_config,
                        tokenizer_source=loaded.tokenizer_path, source=str(source))
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s in %.1fs", dest, time.perf_counter() - start)
    return dest


def main(argv: list[str] | None = None) -> int:
    """Run the converter; 0 on success, 2 on bad input (one-line error on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return int(e.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("jaxllm").setLevel(logging.INFO)
    try:
        convert(args.source, args.dest, args.dtype, args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0
