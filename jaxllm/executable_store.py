"""Compiled step programs kept on disk, so a warm start loads them instead of tracing the model.

JAX's persistent compilation cache skips XLA's compile but not tracing and lowering: for the
default model that was ~4 s of a ~7 s warm start (15 buckets x 30 layers of Python). Here each
program warm-up compiles is serialized next to that cache, under a key derived from everything
that decides the program without tracing it: the source of jaxllm and its kernels, the JAX /
jaxlib / flax versions and XLA flags, the devices, the model's static structure and every
input's shape, dtype and sharding. Change any of these and the key changes; a file that fails to
load is ignored (and logged), and the program is compiled as if it were absent.

Loading a file unpickles it: point `directory` only at a place you trust, as for JAX's cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
from jax.experimental import serialize_executable

from jaxllm.kernels.native_build import cpu_features

logger = logging.getLogger(__name__)

_SOURCE_SUFFIXES = (".py", ".cc", ".h")


def source_fingerprint(packages: Iterable[Any]) -> str:
    """sha256 of every .py / .cc / .h file under the given packages' directories."""
    h = hashlib.sha256()
    for pkg in packages:
        root = Path(pkg.__file__).parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def environment_fingerprint() -> str:
    """What, besides the program's source and inputs, decides what XLA builds."""
    devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in jax.devices()]
    parts = [jax.__version__, jaxlib.__version__, flax.__version__,
             jax.devices()[0].client.platform_version, repr(devices), cpu_features(),
             os.environ.get("XLA_FLAGS", ""), str(jax.config.jax_enable_x64),
             str(jax.config.jax_default_matmul_precision)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def describe_inputs(tree: Any, shardings: bool = True) -> str:
    """Structure, shapes, dtypes (and shardings) of a pytree of arrays or ShapeDtypeStructs.

    `shardings=False` for inputs that are another program's outputs: a traced and a loaded
    program spell the same output sharding differently; it is decided by that program's own
    (keyed) inputs."""
    leaves, treedef = jax.tree.flatten(tree)
    rows = [str(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None) if shardings else None
        rows.append(f"{x.shape}|{x.dtype}|{getattr(x, 'weak_type', False)}|{sharding}")
    return "\n".join(rows)


_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"


class _CacheHits(threading.local):
    """Per thread: did the last compile come from JAX's persistent cache?"""

    hit = False


_hits = _CacheHits()


def _on_event(event: str, **_: object) -> None:
    if event == _JAX_CACHE_HIT:
        _hits.hit = True


jax.monitoring.register_event_listener(_on_event)  # once; other events return at once


def compile_for_store(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, bool]:
    """Compile a program the store may save: (program, whether saving it is safe).

    An XLA CPU executable that JAX's persistent cache served is not whole when serialized
    again: loaded by a later process it fails on its first run ("Function
    bitcast_gather_fusion.1 not found"), which took the server down on its second warm start.
    So a program JAX's cache served is run but not saved (the next start gets it from JAX's
    cache again); a fresh compile is saved. JAX records the hit on the compiling thread.
    """
    _hits.hit = False
    compiled = lowered.compile()
    return compiled, not _hits.hit


class ExecutableStore:
    """A directory of serialized `jax.stages.Compiled` programs, one file per key."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str,
                 prepare: Callable[[str], None] = lambda requirement: None) -> None:
        """`fingerprint` covers what all programs of one runner share (see module doc);
        `prepare(r)` runs before loading a program saved with requirement r (custom-call
        handlers the program calls must be registered before XLA loads it)."""
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.prepare = prepare

    def _path(self, name: str, inputs: str) -> Path:
        key = hashlib.sha256(f"{self.fingerprint}\0{name}\0{inputs}".encode()).hexdigest()
        return self.directory / f"{name}-{key[:32]}.pkl"

    def load(self, name: str, inputs: str) -> jax.stages.Compiled | None:
        """The program saved for (name, inputs), or None when absent or unloadable."""
        path = self._path(name, inputs)
        if not path.is_file():
            return None
        try:
            with path.open("rb") as f:
                requirements, (serialized, in_tree, out_tree) = pickle.load(f)
            for requirement in requirements:
                self.prepare(requirement)
            return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree)
        except Exception as e:  # a truncated or foreign file: compile instead
            logger.warning("ignoring saved program %s (%s: %s)", path, type(e).__name__, e)
            return None

    def save(self, name: str, inputs: str, compiled: jax.stages.Compiled,
             requirements: Iterable[str] = ()) -> None:
        """Write atomically (a concurrent reader sees the old file or the whole new one);
        programs that cannot be serialized are skipped with a log line."""
        try:
            payload = pickle.dumps((list(requirements), serialize_executable.serialize(compiled)))
        except Exception as e:
            logger.info("program %s not saved (%s: %s)", name, type(e).__name__, e)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.replace(tmp, self._path(name, inputs))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
