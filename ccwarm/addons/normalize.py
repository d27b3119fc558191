"""Keep Claude Code's prompt prefix byte-stable for local upstreams.

Claude Code starts its system prompt with a billing block whose `cch=` changes on every request;
a local server that caches the KV state of the prompt prefix then prefills 20k+ tokens again on
every turn. This addon removes that block (and blocks matching user patterns) from
`/v1/messages` and `/v1/messages/count_tokens` requests, leaving every other byte as it was, and
streams SSE responses through unbuffered.

    mitmdump -s addons/normalize.py --mode reverse:http://127.0.0.1:8080@8082
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http

from ccwarm import flowmeta, payload

FIRST_PARTY_HOST = "api.anthropic.com"
METADATA_KEY = flowmeta.NORMALIZE_KEY


class Normalize:
    def __init__(self) -> None:
        self.patterns: list[re.Pattern[str]] = []

    def load(self, loader) -> None:
        loader.add_option("normalize", bool, True, "Strip volatile system blocks from Claude Code requests.")
        loader.add_option(
            "normalize_drop",
            Sequence[str],
            [],
            """
            Extra regular expression: system blocks (or, for a string system prompt, lines) whose
            text matches are dropped too. May be passed multiple times.
            """,
        )
        loader.add_option(
            "normalize_keep_first_party",
            bool,
            True,
            f"Never strip requests going to {FIRST_PARTY_HOST}, which uses the billing block to recognise Claude Code.",
        )
        loader.add_option(
            "normalize_keep_sse_body",
            bool,
            True,
            "Keep streamed SSE response bodies on the flow (sets store_streamed_bodies) so later addons and mitmweb "
            "see them.",
        )

    def configure(self, updated: set[str]) -> None:
        if "normalize_drop" in updated:
            patterns = []
            for spec in ctx.options.normalize_drop:
                try:
                    patterns.append(re.compile(spec))
                except re.error as e:
                    raise exceptions.OptionsError(f"Invalid normalize_drop pattern {spec!r}: {e}") from e
            self.patterns = patterns
        # store_streamed_bodies belongs to mitmproxy's proxyserver addon, absent in bare test masters.
        if (
            "normalize_keep_sse_body" in updated
            and ctx.options.normalize_keep_sse_body
            and "store_streamed_bodies" in ctx.options
        ):
            ctx.options.update(store_streamed_bodies=True)

    def request(self, flow: http.HTTPFlow) -> None:
        if not ctx.options.normalize or flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if req.method != "POST" or not payload.is_messages_path(req.path):
            return
        if ctx.options.normalize_keep_first_party and req.pretty_host == FIRST_PARTY_HOST:
            logging.debug(f"normalize: {FIRST_PARTY_HOST} request left as sent")
            return
        encoding = payload.body_encoding(req.headers)
        if encoding is not None:
            logging.warning(f"normalize: {req.path}: body has content-encoding {encoding!r}; forwarded untouched")
            return
        try:
            result = payload.strip_volatile(req.raw_content or b"", self.patterns)
        except payload.PayloadError as e:
            logging.warning(f"normalize: {req.path}: {e}; forwarded untouched")
            return
        except Exception:  # the proxy must forward even if our parser has a bug
            logging.exception(f"normalize: {req.path}: unexpected error; forwarded untouched")
            return
        if not result.changed:
            return
        req.content = result.body
        notes = [d.describe() for d in result.dropped]
        flow.comment = "; ".join([flow.comment, *notes] if flow.comment else notes)
        flow.metadata[METADATA_KEY] = {
            "dropped": [{"where": d.where, "reason": d.reason, "text": d.text} for d in result.dropped]
        }
        logging.info(f"normalize: {'; '.join(notes)}")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Decided on headers so the first event reaches Claude Code as soon as the upstream sends it.
        if flow.response and flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [Normalize()]
