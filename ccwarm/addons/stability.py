"""Find what breaks Claude Code's prompt prefix, live: diff each request against the previous one.

For every `POST /v1/messages` (not `count_tokens`) this addon compares the body with the previous
request of the same conversation (session id + agent id; side requests apart) in the order a
server renders it (tools, system, messages) and classifies every change: append-only growth,
a prefix break (an earlier part changed: the whole prompt after it is prefilled again), or a
JSON-only change. Prefix breaks are flagged on the flow (`flow.marked`, a one-line comment, the
structured diff in `flow.metadata["ccwarm.stability"]`) and logged as one warning line each.

    mitmdump -s addons/normalize.py -s addons/stability.py --mode reverse:http://127.0.0.1:8080@8082
    mitmweb  -s addons/normalize.py -s addons/stability.py --mode reverse:http://127.0.0.1:8080@8082

Loaded after normalize.py it diffs what is forwarded upstream (after normalize removed the billing
block; in fact the body as it left, after every addon's request hook) and shows in its content
view ("Claude Code", picked automatically for these requests) which blocks normalize dropped.
The mitmproxy command `stability.report PATH` writes the per-conversation summary to PATH.json
and PATH.md (`--set stability_report=PATH` does it on shutdown). In mitmweb, add the comment
column to see the one-line notes in the flow list: `--set web_columns=icon --set web_columns=path
--set web_columns=method --set web_columns=status --set web_columns=size --set web_columns=time
--set web_columns=comment`.

Off the request path: the `request` hook only takes a reference to the (immutable) body bytes
and copies the headers (about 20-70 us); forwarding goes on at once. One worker thread parses and
diffs (about 1 ms for a 100 KB body), started `stability_delay_ms` (20 ms) after the hook, or
5 ms after the response was handed to the client if the upstream is faster than that. Starting
late matters: CPython threads share one GIL, and a worker started at once competed with mitmproxy
writing the request upstream (+2 ms p50 on the forward through a real mitmdump); started late it
runs while the upstream works on the request (a model server needs far longer than 20 ms), or
after the reply went out. By then the request has left, so the worker diffs the final bytes.
Jobs go to the worker in request order, so each conversation is diffed in order. The result is
applied on the event loop (`call_soon_threadsafe`): flags, metadata, one warning per break, and
mitmproxy's `update` hook so mitmweb shows the flags at once. With a model server upstream the
flags are on the flow before it completes (and in `-w` files); with an upstream that answers
within 20 ms they follow a moment after, unless `stability_wait_ms` lets the response hook wait.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from typing import Any

import mitmproxy.types
from mitmproxy import command, contentviews, ctx, exceptions, http
from mitmproxy.hooks import UpdateHook
from mitmproxy.utils import emoji

from ccwarm import flowmeta, jsonsafe, payload, stability

METADATA_KEY = flowmeta.STABILITY_KEY
AFTER_RESPONSE_S = 0.005  # after a fast exchange, let the client take the reply before diffing


def is_diffed_request(req: http.Request) -> bool:
    path = req.path.split("?", 1)[0].rstrip("/")
    return req.method == "POST" and payload.is_messages_path(req.path) and not path.endswith("/count_tokens")


class ClaudeCodeRequestView(contentviews.Contentview):
    """mitmweb/mitmproxy content view: outline of a Claude Code request and its stability diff."""

    name = "Claude Code"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        body = jsonsafe.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        flow = metadata.flow
        flow_meta = flow.metadata if flow is not None else {}
        dropped = flowmeta.dropped(flow_meta)
        msg = metadata.http_message
        headers = dict(msg.headers.items()) if msg is not None else None
        return stability.describe_request(
            body, headers=headers, size=len(data), dropped=dropped, result=flow_meta.get(METADATA_KEY)
        )

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        msg = metadata.http_message
        if (
            isinstance(msg, http.Request)
            and msg.method == "POST"
            and payload.is_messages_path(msg.path)
            and data.lstrip()[:1] == b"{"
        ):
            return 2  # above the JSON view (1) for Claude Code requests
        return -1


class _Job:
    """What the worker needs: references taken in the request hook (no dataclass: mitmproxy loads
    scripts outside sys.modules, where @dataclass with postponed annotations fails)."""

    __slots__ = ("flow_id", "raw", "headers", "dropped", "started")

    def __init__(
        self, flow_id: str, raw: bytes, headers: dict[str, str], dropped: list[dict[str, Any]], started: float
    ) -> None:
        self.flow_id, self.raw, self.headers, self.dropped, self.started = flow_id, raw, headers, dropped, started


class Stability:
    def __init__(self) -> None:
        self.tracker = stability.StabilityTracker()
        self.view = ClaudeCodeRequestView()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: dict[str, _Pending] = {}
        self._queue: collections.deque[_Pending] = collections.deque()
        self._enabled = True
        self._delay = 0.02

    # -- lifecycle --------------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("stability", bool, True, "Diff consecutive Claude Code requests and flag prefix breaks.")
        loader.add_option(
            "stability_mark",
            str,
            ":warning:",
            "Marker set on flows whose request broke the prompt prefix (an emoji shortcode such as :warning:; empty: "
            "do not mark).",
        )
        loader.add_option(
            "stability_delay_ms",
            int,
            20,
            """
            Start the diff this long after the request hook (or as soon as the response is complete,
            if that comes first), so that it never competes with forwarding the request. The diff then
            runs while the upstream works on the request.
            """,
        )
        loader.add_option(
            "stability_wait_ms",
            int,
            0,
            """
            How long the response/error hook may wait for a diff that is not finished yet, so that the
            flags are on the flow before it completes (and before `-w` saves it) even when the
            upstream answers within stability_delay_ms. 0 (default): never delay a response; the flags
            then follow a moment later (mitmweb shows them as they arrive).
            """,
        )
        loader.add_option(
            "stability_report", str, "", "On shutdown, write the stability summary to this path (.json and .md)."
        )
        contentviews.add(self.view)

    def configure(self, updated: set[str]) -> None:
        if "stability_mark" in updated:
            mark = ctx.options.stability_mark
            if mark and mark not in emoji.emoji:
                raise exceptions.OptionsError(
                    f"Invalid stability_mark {mark!r}: use an emoji shortcode such as :warning:, or an empty string"
                )
        for name in ("stability_delay_ms", "stability_wait_ms"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must be 0 or more")
        # Read once here: every ctx.options access deep-copies the value, too slow for the request hook.
        self._enabled = ctx.options.stability
        self._delay = ctx.options.stability_delay_ms / 1000

    def done(self) -> None:
        self.drain(timeout=2.0)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if ctx.options.stability_report:
            self._write_report(ctx.options.stability_report)
        registry = getattr(contentviews, "registry", None)
        by_name = getattr(registry, "_by_name", None)
        if isinstance(by_name, dict) and by_name.get(self.view.name.lower()) is self.view:
            del by_name[self.view.name.lower()]

    # -- hooks ------------------------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        # Runs before the request is forwarded: only cheap checks and references here.
        if not self._enabled or flow.response or flow.error or flow.is_replay == "request":
            return
        req = flow.request
        if not is_diffed_request(req):
            return
        encoding = payload.body_encoding(req.headers)
        if encoding is not None:
            logging.debug(f"stability: {req.path}: content-encoding {encoding!r}, not diffed")
            return
        raw = req.raw_content
        if not raw:
            logging.debug(f"stability: {req.path}: no body, not diffed")
            return
        # Header.fields is the raw list: much cheaper than the multidict's items().
        headers = {k.decode("latin-1").lower(): v.decode("utf-8", "surrogateescape") for k, v in req.headers.fields}
        for name in [n for n in headers if stability.is_secret_header(n)]:
            del headers[name]
        dropped = flowmeta.dropped(flow.metadata)
        entry = _Pending(flow, _Job(flow.id, raw, headers, dropped, time.perf_counter()))
        self._pending[flow.id] = entry
        self._queue.append(entry)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:  # no event loop (unit tests): diff right away; response/error or drain() apply it
            self._start_through(entry)
            return
        entry.future.add_done_callback(lambda _f, flow=flow: self._apply_threadsafe(loop, flow))
        entry.timer = loop.call_later(self._delay, self._start_through, entry)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self._settle(flow)

    async def error(self, flow: http.HTTPFlow) -> None:
        await self._settle(flow)

    # -- commands ---------------------------------------------------------------------------------

    @command.command("stability.report")
    def report(self, path: mitmproxy.types.Path) -> None:
        """Write the prefix stability summary of all conversations seen to PATH.json and PATH.md."""
        self.drain(timeout=1.0)
        self._write_report(str(path))

    # -- internals --------------------------------------------------------------------------------

    def _write_report(self, path: str) -> None:
        try:
            written = self.tracker.write(path)
        except OSError as e:
            logging.error(f"stability: cannot write report to {path}: {e}")
            return
        logging.info(f"stability: report written to {', '.join(str(p) for p in written)}")

    def _start_through(self, entry: _Pending) -> None:
        """Hand the queued jobs up to and including `entry` to the worker, in request order."""
        if entry.submitted:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccwarm-stability")
        while self._queue:
            e = self._queue.popleft()
            e.submitted = True
            if e.timer is not None:
                e.timer.cancel()
            # Diff the body as it left: by now the request went upstream, after every addon's hook.
            final = e.flow.request.raw_content
            if final and final is not e.job.raw and payload.body_encoding(e.flow.request.headers) is None:
                e.job.raw = final
            try:
                self._executor.submit(self._run, e)
            except RuntimeError:  # shutting down
                e.future.cancel()
            if e is entry:
                break

    def _run(self, entry: _Pending) -> None:
        if not entry.future.set_running_or_notify_cancel():
            return
        try:
            entry.future.set_result(self._diff(entry.job))
        except BaseException as e:  # delivered to _apply, which logs it
            entry.future.set_exception(e)

    def _diff(self, job: _Job) -> tuple[dict[str, Any] | None, str | None]:
        """Worker thread: parse, compare, count. Returns (metadata, None) or (None, why not)."""
        try:
            body = jsonsafe.loads(job.raw)
        except jsonsafe.JSONBodyError as e:
            return None, str(e)
        if not isinstance(body, dict):
            return None, f"body is a JSON {type(body).__name__}, not an object"
        obs = self.tracker.observe(body, job.headers, label=job.flow_id, size=len(job.raw), dropped=job.dropped)
        result: dict[str, Any] = {
            "schema_version": stability.SCHEMA_VERSION,
            "conversation": obs.key,
            "session_id": obs.identity.session_id,
            "agent_id": obs.identity.agent_id,
            "kind": str(obs.identity.kind),
            **obs.to_dict(),
            "elapsed_ms": round((time.perf_counter() - job.started) * 1000, 3),
        }
        result.pop("label", None)
        if job.dropped:
            result["normalize_dropped"] = [{"where": d.get("where"), "reason": d.get("reason")} for d in job.dropped]
        return result, None

    def _apply_threadsafe(self, loop: asyncio.AbstractEventLoop, flow: http.HTTPFlow) -> None:
        try:
            loop.call_soon_threadsafe(self._apply, flow)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _apply(self, flow: http.HTTPFlow) -> None:
        """On the event loop: put the result on the flow (once) and tell mitmweb."""
        entry = self._pending.get(flow.id)
        if entry is None or not entry.future.done():
            return
        del self._pending[flow.id]
        try:
            result, why = entry.future.result()
        except concurrent.futures.CancelledError:
            return
        except Exception:  # a bug in the diff must never hurt the proxy
            logging.exception(f"stability: {flow.request.path}: diff failed")
            return
        if result is None:
            logging.debug(f"stability: {flow.request.path}: {why}; not diffed")
            return
        if flow.request.raw_content is not entry.job.raw:
            result["body_changed_after_diff"] = True
            logging.debug(
                "stability: an addon after stability changed the body; the diff shows the body as stability saw it"
            )
        flow.metadata[METADATA_KEY] = result
        breaks = result["prefix_breaks"]
        if breaks:
            if ctx.options.stability_mark and not flow.marked:
                flow.marked = ctx.options.stability_mark
            first = breaks[0]
            more = f" (+{len(breaks) - 1} more)" if len(breaks) > 1 else ""
            note = f"prefix break at {first['path']} @{first['offset']}: {first['reason']}{more}"
            if note not in (flow.comment or ""):
                flow.comment = f"{flow.comment}; {note}" if flow.comment else note
            for b in breaks:
                logging.warning(
                    f"stability: {result['conversation']} request {result['index']}: prefix break at {b['path']} "
                    f"@{b['offset']} ({b['prefix_chars']} chars unchanged before it): {b['reason']}"
                )
        try:
            ctx.master.addons.trigger(UpdateHook([flow]))
        except Exception:  # no master (bare use) or a view that is gone
            logging.debug("stability: could not send the flow update", exc_info=True)

    async def _settle(self, flow: http.HTTPFlow) -> None:
        entry = self._pending.get(flow.id)
        if entry is None:
            return
        wait = ctx.options.stability_wait_ms / 1000
        if not entry.submitted:
            # The exchange is over before the delay ran out (a fast upstream). Start the diff a moment
            # after the response is handed to the client (this hook runs just before that), unless
            # asked to wait for the flags.
            loop = asyncio.get_running_loop()
            if entry.timer is not None:
                entry.timer.cancel()
            if wait > 0:
                entry.timer = None
                loop.call_soon(self._start_through, entry)
            else:
                entry.timer = loop.call_later(min(AFTER_RESPONSE_S, self._delay), self._start_through, entry)
        if not entry.future.done():
            if wait <= 0:
                return
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), wait)
            except TimeoutError:
                logging.debug(
                    f"stability: diff of {flow.request.path} not finished after {wait:.3f}s; flags follow later"
                )
                return
            except Exception:
                pass
        self._apply(flow)

    def drain(self, timeout: float = 2.0) -> None:
        """Run queued diffs now, wait for them (bounded) and apply them: for shutdown, reports, tests."""
        if self._queue:
            self._start_through(self._queue[-1])
        if self._executor is not None:
            try:
                self._executor.submit(lambda: None).result(timeout=timeout)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        for entry in list(self._pending.values()):
            if entry.future.done():
                self._apply(entry.flow)


class _Pending:
    """A diffed request on its way: its job, the future of its result, whether it was handed to the worker."""

    __slots__ = ("flow", "job", "future", "submitted", "timer")

    def __init__(self, flow: http.HTTPFlow, job: _Job) -> None:
        self.flow, self.job = flow, job
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = False
        self.timer: asyncio.TimerHandle | None = None


addons = [Stability()]
