"""AsyncEngine: the engine loop in its own thread, requests as async iterators (for the server).

The loop thread owns the `LLMEngine` (scheduler, runner, pages); every other thread talks to it
through a command queue, so nothing in the engine needs locks. Outputs travel back to each
request's asyncio queue: a step's outputs in one `call_soon_threadsafe` per event loop (each
call takes the loop's lock and writes its wake-up pipe: one per output cost the engine thread
~0.56 ms per step at 256 streams, ~0.05 ms batched; `benchmarks/stream_delivery.py`). A
crash in the loop fails every pending request with `EngineDeadError` and marks the engine
unhealthy rather than hanging them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from jaxllm.config import EngineConfig
from jaxllm.engine import EngineStats, LLMEngine
from jaxllm.errors import EngineDeadError, EngineOverloadedError
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """On the event loop: hand a step's outputs to their requests' queues, in order."""
    for q, item in items:
        q.put_nowait(item)


class AsyncEngine:
    """Async front of an `LLMEngine` running in a background thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.engine_config: EngineConfig = engine.config
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        self._stopping = False
        self._paused = False
        self._stats = engine.get_stats()
        self._thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    async def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model and warm up (in a worker thread, so the event loop stays free)."""
        engine = await asyncio.to_thread(LLMEngine, config)
        return cls(engine)

    # -- the loop thread -------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                busy = self.engine.has_unfinished_requests() and not self._paused
                self._run_commands(block=not busy)
                if self._stopping:
                    break
                if self.engine.has_unfinished_requests() and not self._paused:
                    self._deliver(self.engine.step())
                self._stats = self.engine.get_stats()
        except BaseException as e:  # noqa: BLE001 - any crash must fail requests, not hang them
            logger.exception("engine loop crashed")
            self._dead = e
            self._fail_all(EngineDeadError(f"engine loop crashed: {type(e).__name__}: {e}"))

    def _run_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = cmd
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outs: list[RequestOutput]) -> None:
        """Send a step's outputs to their streams: one call per event loop they live on."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        streams = self._streams
        for out in outs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del streams[out.request_id]
            items = by_loop.get(stream.loop)
            if items is None:
                items = by_loop[stream.loop] = []
            items.append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is left to read these
                logger.warning("event loop closed under %d streams: aborting them", len(items))
                for _, out in items:
                    if not out.finished:
                        self._abort_now(out.request_id)

    def _fail_all(self, err: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.put(err)
        self._streams.clear()
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(err)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop thread and await its result."""
        self._raise_if_dead()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        if self._dead is not None:  # died between the check and the put
            self._fail_all(EngineDeadError("engine is dead"))
        return await asyncio.wrap_future(fut)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")
        if self._stopping:
            raise EngineDeadError("engine is shutting down")

    # -- public API -----------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams,
                       request_id: str, *, cache_salt: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield outputs (`sampling_params.output_kind`) until finished; abort the request if
        the consumer leaves."""
        self._raise_if_dead()
        if self._stats.num_waiting >= self.engine_config.max_waiting_requests:
            raise EngineOverloadedError(
                f"too many waiting requests ({self._stats.num_waiting}); retry later")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> None:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.engine.add_request(prompt, sampling_params, request_id,
                                    cache_salt=cache_salt, priority=priority)
            self._streams[request_id] = stream

        await self._call(add)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished and self._dead is None and not self._stopping:
                self._commands.put((lambda: self._abort_now(request_id),
                                    concurrent.futures.Future()))

    def _abort_now(self, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return self.engine.abort_request(request_id)

    async def abort(self, request_id: str) -> bool:
        """Abort a request; its stream ends with finish_reason "abort". Pages free this step."""
        def run() -> bool:
            stream = self._streams.pop(request_id, None)
            out = self.engine.abort_request(request_id, return_output=True)
            if stream is not None and out is not None:
                stream.put(out)
            return out is not None
        return await self._call(run)

    async def check_health(self) -> None:
        self._raise_if_dead()
        if not self._thread.is_alive():
            raise EngineDeadError("engine loop thread is not running")

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive() and not self._stopping

    async def reset_prefix_cache(self) -> bool:
        return await self._call(self.engine.reset_prefix_cache)

    def get_stats(self) -> EngineStats:
        return self._stats

    async def pause_generation(self) -> None:
        await self._call(lambda: setattr(self, "_paused", True))

    async def resume_generation(self) -> None:
        await self._call(lambda: setattr(self, "_paused", False))

    async def sleep(self, level: int = 1) -> None:
        await self._call(lambda: self.engine.sleep(level))

    async def wake_up(self) -> None:
        await self._call(self.engine.wake_up)

    async def start_profile(self, log_dir: str | None = None) -> None:
        await self._call(lambda: self.engine.start_profile(log_dir))

    async def stop_profile(self) -> None:
        await self._call(self.engine.stop_profile)

    async def wait_for_requests_to_drain(self, timeout: float | None = None) -> None:
        """Wait until no request is running or waiting (or `timeout` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while await self._call(self.engine.has_unfinished_requests):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"requests still running after {timeout} s")
            await asyncio.sleep(0.05)

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop the loop, optionally after letting in-flight requests finish."""
        if drain_timeout and self._dead is None:
            try:
                await self.wait_for_requests_to_drain(drain_timeout)
            except (TimeoutError, EngineDeadError):
                pass
        self._stopping = True
        await asyncio.to_thread(self._thread.join, 10)
        self._fail_all(EngineDeadError("engine shut down"))
