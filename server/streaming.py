"""Server-sent-events framing and the async plumbing shared by streaming handlers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> str:
    """One SSE `data:` event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive, tagging each with its index.

    Closing the merged iterator cancels the readers, which closes the inner iterators
    (the engine then aborts their requests).
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, None, False))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 -- forwarded to the consumer
            await queue.put((i, None, exc, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item, exc, done = await queue.get()
            if exc is not None:
                raise exc
            if done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_unless_disconnected(request: Request, work: Callable[[], Awaitable[T]],
                                  on_disconnect: Callable[[], Awaitable[None]]) -> T | None:
    """Run `work` while watching the client; on disconnect cancel it, call `on_disconnect`
    (abort the engine requests) and return None (nobody is left to answer)."""
    work_task = asyncio.ensure_future(work())

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch_task = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work_task.cancel()
        watch_task.cancel()
        await on_disconnect()
        raise
    if work_task in done:
        watch_task.cancel()
        return work_task.result()
    work_task.cancel()
    await asyncio.gather(work_task, return_exceptions=True)
    await on_disconnect()
    return None


async def first_item(stream: AsyncGenerator[T, None]) -> T:
    """The first item of `stream`, awaited before a streaming response is started (so that an
    early error still answers with its HTTP status); `stream` is closed if that fails."""
    try:
        return await anext(stream)
    except BaseException:
        await stream.aclose()
        raise


async def last_unless_disconnected(request: Request, stream: AsyncIterator[T],
                                   on_disconnect: Callable[[], Awaitable[None]]) -> T | None:
    """The last item of `stream` (a non-streaming answer's final output), or None if the client
    disconnected first (`run_unless_disconnected`: then `on_disconnect` has run)."""

    async def collect() -> T | None:
        final = None
        async for out in stream:
            final = out
        return final

    return await run_unless_disconnected(request, collect, on_disconnect)
