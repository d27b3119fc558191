"""TEST ONLY: scripted replies (`--test-forced-replies FILE`) fed through the real model as if sampled.

Why: a random-weight test model never emits tool-call markup by itself, yet the tool round trip
must be checked end to end. With this, the prompt is rendered, prefilled and decoded for real;
only the choice of each next token is taken from the script (forced decoding), followed by the
end-of-turn token. Never enable it in production.

File: a JSON list of entries `{"when": "<substring>", "reply": "<text>", "fail_after_tokens": n}`.
The first entry whose `when` occurs in the JSON of the request's last message (mid-conversation
`role: "system"` reminders after it skipped) is used (an entry without `when` matches every
request); `fail_after_tokens` makes generation raise after n tokens, to test mid-stream errors.
Requests that match no entry are sampled normally.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_backend.jobs import GenerationParams


@dataclass(frozen=True)
class ScriptedReply:
    when: str | None
    reply: str
    fail_after_tokens: int | None = None


def load_script(path: Path) -> list[ScriptedReply]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{when, reply}} entries")
    out = []
    for i, e in enumerate(data):
        if not isinstance(e, dict) or not isinstance(e.get("reply", ""), str):
            raise ValueError(f"{path}[{i}]: expected an object with a string 'reply'")
        out.append(ScriptedReply(e.get("when"), e.get("reply", ""), e.get("fail_after_tokens")))
    return out


def match(script: list[ScriptedReply], body: dict[str, Any]) -> ScriptedReply | None:
    msgs = [m for m in body.get("messages") or [] if not (isinstance(m, dict) and m.get("role") == "system")]
    last = json.dumps(msgs[-1], ensure_ascii=False) if msgs else ""
    for e in script:
        if e.when is None or e.when in last:
            return e
    return None


def _failing(tokens: Iterable[int], after: int) -> Iterator[int]:
    """`tokens`, then a failure where token `after + 1` would come: a mid-stream generation error."""
    for i, tok in enumerate(tokens):
        if i >= after:
            raise RuntimeError(f"test-induced failure after {after} output tokens")
        yield tok


def scripted_replies(
    script: list[ScriptedReply], encode: Callable[[str], list[int]], eos_id: int | None
) -> Callable[[dict[str, Any], GenerationParams], GenerationParams]:
    """The server's `params_hook` for `--test-forced-replies`: a matching request decodes its reply
    (then end of turn) by forced tokens instead of sampling; others are left as they are."""

    def hook(body: dict[str, Any], params: GenerationParams) -> GenerationParams:
        entry = match(script, body)
        if entry is None:
            return params
        tokens = [*encode(entry.reply), *([eos_id] if eos_id is not None else [])]
        forced = tokens if entry.fail_after_tokens is None else _failing(tokens, entry.fail_after_tokens)
        return dataclasses.replace(params, forced_tokens=forced)

    return hook
