"""Turn a validated Messages request into the exact token ids the model sees: ONE deterministic path.

Why this module matters: the prefix cache can only reuse work if the same history always renders
to the same tokens, and if turn N's tokens are a prefix of turn N+1's. So:
- the request is mapped to chat-template messages in one fixed way (chat_messages.py: thinking
  dropped, images replaced by a placeholder, string content == one-text-block content,
  mid-conversation system messages kept where they stand);
- the chat template is rendered once per message prefix and each message's *segment* (the text
  it added) is tokenized on its own, so a segment's tokens never depend on what follows it;
- an assistant segment is tokenized as generation prompt + the rest, exactly the split the model
  saw when it produced that turn, so its own output renders back to the tokens it generated.
Segments are memoized by a hash chain over the messages, so a new turn renders only its tail.
The result carries boundaries (end of system+tools, end of each message) where a cache can
snapshot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cache_backend.chat_messages import Chat, ChatMapper, probe_template
from cache_backend.errors import InvalidRequest
from cache_backend.hermes import FALLBACK_TEMPLATE
from cache_backend.prompt import RenderedPrompt
from cache_backend.request import (
    MessagesRequest,
)

log = logging.getLogger("cache_backend.render")


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def _max_token_chars(tokenizer: Any) -> int:
    """The most text characters one token can stand for, from the vocabulary's own strings.

    Vocabulary strings are never shorter, in characters, than the text they encode: byte-level
    BPE spells each byte as one character (and a character is at least one byte), SentencePiece
    spells a space as one "\u2581", byte fallback spells one byte as "<0x0A>". Unknown tokenizers
    get a generous constant.
    """
    try:
        vocab = tokenizer.get_vocab()
        return max(16, max(len(str(t)) for t in vocab))
    except Exception:  # noqa: BLE001 - any tokenizer without a readable vocabulary
        return 1024


class Renderer:
    """Request -> RenderedPrompt for one tokenizer. Thread-safe only if used from one thread."""

    def __init__(
        self, tokenizer: Any, *, memo_size: int = 8192, outputs_size: int = 4096, context_limit: int | None = None
    ) -> None:
        self.tok = tokenizer
        # A prompt longer than context_limit tokens is refused before it is tokenized: no token
        # covers more than max_token_chars characters, so a longer text cannot fit. Tokenizing
        # a 40 MB body took 240 s on the single render thread, blocking every other request.
        self.context_limit = context_limit
        self.max_token_chars = _max_token_chars(tokenizer)
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._memo_size = memo_size
        # Told of every newly tokenized segment (key, tokens): e.g. TokenLog.append, so that
        # remember_segment can bring the memo back after a restart.
        self.on_segment: Callable[[str, list[int]], None] | None = None
        self._preambles: dict[str, str] = {}
        # Text the model generated -> the exact tokens it generated (see remember_output).
        self._outputs: OrderedDict[str, list[int]] = OrderedDict()
        self._outputs_size = outputs_size
        self._outputs_lock = threading.Lock()
        self._template_override: str | None = None
        if getattr(tokenizer, "chat_template", None) is None and getattr(tokenizer, "_chat_template", None) is None:
            self._template_override = FALLBACK_TEMPLATE
        src = getattr(tokenizer, "chat_template", None)
        self._template_id = _hash(str(self._template_override or src or "custom"))
        self.caps = probe_template(self._try)
        self.native_tools, self.native_tool_calls = self.caps.native_tools, self.caps.native_tool_calls
        self._mapper = ChatMapper(self.caps)
        log.info(
            "chat template: tools=%s tool_calls=%s tool_role=%s mid_system=%s",
            self.caps.native_tools,
            self.caps.native_tool_calls,
            self.caps.native_tool_role,
            self.caps.mid_system,
        )

    # --- template access ------------------------------------------------------------------

    def _apply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, gen: bool) -> str:
        kwargs: dict[str, Any] = {"add_generation_prompt": gen, "tokenize": False}
        if tools:
            kwargs["tools"] = tools
        if self._template_override is not None:
            kwargs["chat_template"] = self._template_override
        out = self.tok.apply_chat_template(messages, **kwargs)
        if not isinstance(out, str):
            raise TypeError(f"chat template returned {type(out).__name__}, expected str")
        return out

    def _try(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, gen: bool = False
    ) -> str | None:
        try:
            return self._apply(messages, tools, gen)
        except Exception:
            return None

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False)) if text else []

    # --- the model's own outputs ----------------------------------------------------------

    def remember_output(self, text: str, tokens: list[int]) -> None:
        """Record that the model produced `tokens` (end-of-turn excluded), decoding to `text`.

        Sampling does not always pick the canonical tokenization of its own text (twelve "\n"
        tokens where the tokenizer would merge them, "hel"+"lo"): when that turn comes back in a
        later request, its segment is built from these tokens, so the prompt extends what the
        KV cache already holds. Called from the engine thread.
        """
        if not text or not tokens:
            return
        with self._outputs_lock:
            self._outputs[text] = list(tokens)
            self._outputs.move_to_end(text)
            while len(self._outputs) > self._outputs_size:
                self._outputs.popitem(last=False)

    def _own_tokens(self, rest: str) -> tuple[str, list[int]] | None:
        """The longest remembered output that `rest` starts with."""
        with self._outputs_lock:
            best = None
            for text in self._outputs:
                if rest.startswith(text) and (best is None or len(text) > len(best)):
                    best = text
            if best is None:
                return None
            self._outputs.move_to_end(best)
            return best, self._outputs[best]

    # --- chat messages -> tokens ----------------------------------------------------------

    def _memo_get(self, key: str) -> list[int] | None:
        v = self._memo.get(key)
        if v is not None:
            self._memo.move_to_end(key)
        return v

    def remember_segment(self, key: str, tokens: list[int]) -> None:
        """A segment tokenized earlier (by this renderer, before a restart)."""
        self._memo[key] = tokens
        self._memo.move_to_end(key)
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)

    def _memo_put(self, key: str, tokens: list[int]) -> None:
        self.remember_segment(key, tokens)
        if self.on_segment is not None:
            self.on_segment(key, tokens)

    def render(self, req: MessagesRequest) -> RenderedPrompt:
        """The prompt for `req`, ending with the generation prompt (and any assistant prefill)."""
        chat = self._mapper.chat(req)
        try:
            return self._render_segmented(chat)
        except InvalidRequest:
            raise
        except Exception as e:  # a template that raises on this conversation
            raise InvalidRequest(f"messages: the chat template could not render this conversation: {e}") from None

    def _check_length(self, chars: int) -> None:
        if self.context_limit and chars > self.context_limit * self.max_token_chars:
            fewest = -(-chars // self.max_token_chars)
            raise InvalidRequest(
                f"prompt is too long: {chars} characters are at least {fewest} tokens > {self.context_limit} maximum"
            )

    def _preamble(self, msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None, key: str) -> str:
        """What the template emits before any message (a tools-only system block), when separable."""
        if not tools:
            return ""
        hit = self._preambles.get(key)
        if hit is None:
            s0 = self._try([], tools)
            hit = s0 if s0 and (self._try(msgs[:1], tools) or "").startswith(s0) else ""
            self._preambles[key] = hit
            if len(self._preambles) > 64:
                self._preambles.pop(next(iter(self._preambles)))
        return hit

    def _render_segmented(self, chat: Chat) -> RenderedPrompt:
        msgs, tools = chat.messages, chat.tools
        n = len(msgs)
        keys: list[str] = []
        h = _hash(self._template_id, _dumps(tools))
        tools_key = h
        for m in msgs:
            h = _hash(h, _dumps(m))
            keys.append(h)
        segs: list[list[int] | None] = [self._memo_get(k) for k in keys]
        known = 0
        while known < n and segs[known] is not None:
            known += 1

        full = self._apply(msgs, tools, gen=True)
        self._check_length(len(full) + len(chat.prefill or ""))
        preamble = self._preamble(msgs, tools, tools_key) if n else ""
        if preamble and msgs[0]["role"] == "system":
            preamble = ""
        prev = self._apply(msgs[:known], tools, gen=False) if known else preamble
        ok = True
        new_texts: dict[int, str] = {}
        for k in range(known, n):
            cur = self._apply(msgs[: k + 1], tools, gen=False)
            if not cur.startswith(prev):
                ok = False
                break
            new_texts[k] = cur[len(prev) :]
            prev = cur
        if not ok or not full.startswith(prev):
            log.warning("chat template is not append-only for this conversation; tokenizing it whole")
            tokens = self.encode(full)
            gen_start = len(tokens)
            if chat.prefill:
                tokens += self.encode(chat.prefill)
            return RenderedPrompt(tokens, 0, (), gen_start, segmented=False, placeholders=chat.placeholders)

        gen_text = full[len(prev) :]
        for k, text in new_texts.items():
            if msgs[k]["role"] == "assistant" and gen_text and text.startswith(gen_text):
                # Split exactly where generation began when the model produced this turn, and
                # reuse the model's own tokens for the part it generated, when we know them.
                rest = text[len(gen_text) :]
                own = self._own_tokens(rest)
                if own is not None:
                    toks = self.encode(gen_text) + own[1] + self.encode(rest[len(own[0]) :])
                else:
                    toks = self.encode(gen_text) + self.encode(rest)
            else:
                toks = self.encode(text)
            segs[k] = toks
            self._memo_put(keys[k], toks)

        tokens: list[int] = []
        if preamble:
            pre = self._memo_get(tools_key)
            if pre is None:
                pre = self.encode(preamble)
                self._memo_put(tools_key, pre)
            tokens = list(pre)
        prefix_end = len(tokens)
        ends = []
        for s in segs:
            assert s is not None
            tokens += s
            ends.append(len(tokens))
        if msgs and msgs[0]["role"] == "system":
            prefix_end = ends[0]
        gen_start = len(tokens)
        tokens += self.encode(gen_text)
        if chat.prefill:
            tokens += self.encode(chat.prefill)
        return RenderedPrompt(tokens, prefix_end, tuple(ends), gen_start, placeholders=chat.placeholders)

    def count(self, req: MessagesRequest) -> int:
        return len(self.render(req).tokens)
