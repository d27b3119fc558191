"""A job's engine events to its client: an SSE stream, or one JSON response when not streamed.

Both cancel the job when the client goes away, so a dropped client stops costing compute: the
stream when it is closed, the non-streamed response by looking for a disconnect on a clock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from cache_backend import sse
from cache_backend.errors import error_body
from cache_backend.jobs import Failed, Finished, Job, Progress, Started
from cache_backend.progress import ProgressBlock

log = logging.getLogger("cache_backend.app")

DISCONNECT_CHECK_S = 0.25  # how often a non-streamed request looks for a client that went away


def _failure_text(ev: Failed) -> str:
    return ev.message if ev.error_type == "overloaded_error" else f"generation failed: {ev.message}"


def _usage_of(ev: Started | Finished, output_tokens: int = 0) -> dict[str, Any]:
    return sse.usage(ev.prompt_tokens - ev.n_restored, output_tokens, cache_read=ev.n_restored)


async def stream_events(
    job: Job,
    events: asyncio.Queue[Any],
    msg_id: str,
    model: str,
    ping_interval: float,
    progress: ProgressBlock | None = None,
):
    """SSE bytes for one job. Silence longer than `ping_interval` gets a ping (an SSE comment
    before the worker starts the job). With `progress`, a long prefill streams a thinking block
    that reports it (see progress.py)."""
    done = False
    started = False
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    try:
        while True:
            wait = max(0.0, last_sent + ping_interval - loop.time())
            try:
                ev = await asyncio.wait_for(events.get(), timeout=wait)
            except TimeoutError:
                last_sent = loop.time()
                yield sse.encode(sse.ping()) if started else sse.comment("queued")
                continue
            if isinstance(ev, Progress):
                for out in progress.on_progress(ev, loop.time()) if progress is not None else ():
                    last_sent = loop.time()
                    yield sse.encode(out)
                continue
            last_sent = loop.time()
            if progress is not None and not isinstance(ev, Started):
                for out in progress.close():
                    yield sse.encode(out)
            if isinstance(ev, Started):
                started = True
                if progress is not None:
                    progress.started(loop.time(), ev.n_restored)
                yield sse.encode(sse.message_start(msg_id, model, _usage_of(ev)))
            elif isinstance(ev, dict):
                yield sse.encode(progress.shifted(ev) if progress is not None else ev)
            elif isinstance(ev, Finished):
                done = True
                yield sse.encode(sse.message_delta(ev.stop_reason, ev.stop_sequence, _usage_of(ev, ev.output_tokens)))
                yield sse.encode(sse.message_stop())
                return
            elif isinstance(ev, Failed):
                done = True
                yield sse.encode(sse.error(ev.error_type, _failure_text(ev)))
                return
    finally:
        if not done:
            log.info("request %s: the client closed the stream", job.request_id)
            job.cancel.set()


async def collect(
    request: Request, job: Job, events: asyncio.Queue[Any], msg_id: str, model: str, request_id: str
) -> Response:
    """The non-streamed response; a client that goes away cancels the job.

    The disconnect check runs on a clock, not only when no event arrives: during decoding events
    never stop, and a dropped client must not keep the worker busy until max_tokens.
    """
    finished = False
    loop = asyncio.get_running_loop()
    next_check = loop.time() + DISCONNECT_CHECK_S
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                ev = None
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_CHECK_S
                if await request.is_disconnected():
                    log.info("request %s: the client disconnected", request_id)
                    return Response(status_code=499)
            if isinstance(ev, Finished):
                finished = True
                body = sse.message_shell(
                    msg_id, model, ev.blocks, ev.stop_reason, ev.stop_sequence, _usage_of(ev, ev.output_tokens)
                )
                return JSONResponse(body, headers={"request-id": request_id})
            if isinstance(ev, Failed):
                finished = True
                status = 529 if ev.error_type == "overloaded_error" else 500
                return JSONResponse(
                    error_body(ev.error_type, _failure_text(ev)), status_code=status, headers={"request-id": request_id}
                )
    finally:
        if not finished:
            job.cancel.set()
