"""The engine <-> PrefixCache contract, in process: what is saved, and that restoring is exact."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from cache_backend.detok import IncrementalDetokenizer
from cache_backend.engine import Engine
from cache_backend.jobs import Failed, Finished, GenerationParams, Job, Started
from cache_backend.prefix_cache import NoCache, Restored
from cache_backend.prompt import RenderedPrompt
from cache_backend.render import Renderer
from cache_backend.validate import parse_messages_request

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(str(tiny_model_dir))


class Recording(NoCache):
    """Records every save; can restore the last 'generation' save for a prompt that extends it."""

    def __init__(self, restore_from_last: bool = False) -> None:
        self.saves: list[tuple[str, list[int], int]] = []
        self.restore_from_last = restore_from_last
        self.last: tuple[list[int], list[Any]] | None = None

    def restore(self, model: Any, prompt: RenderedPrompt) -> Restored:
        if self.restore_from_last and self.last is not None:
            tokens, cache = self.last
            n = 0
            while n < min(len(tokens), len(prompt.tokens)) and tokens[n] == prompt.tokens[n]:
                n += 1
            if n:
                trim_prompt_cache(cache, len(tokens) - n)
                self.last = None
                return Restored(cache, n)
        return Restored(make_prompt_cache(model), 0)

    def checkpoints(self, prompt: RenderedPrompt, n_restored: int) -> tuple[int, ...]:
        return (prompt.prefix_end,)

    def save(self, tokens: Any, cache: list[Any], kind: Any) -> None:
        self.saves.append((kind, list(tokens), cache[0].offset))
        if kind == "generation":
            self.last = (list(tokens), cache)


def run(engine: Engine, prompt: RenderedPrompt, max_tokens: int = 12) -> tuple[int, Finished]:
    done = threading.Event()
    box: dict[str, Any] = {}

    def sink(ev: Any) -> None:
        if isinstance(ev, Started):
            box["restored"] = ev.n_restored
        elif isinstance(ev, (Finished, Failed)):
            box["end"] = ev
            done.set()

    engine.submit(Job(prompt=prompt, params=GenerationParams(max_tokens=max_tokens, temperature=0.0), sink=sink))
    assert done.wait(60)
    assert isinstance(box["end"], Finished), box["end"]
    return box["restored"], box["end"]


def body(messages: list[dict[str, Any]]) -> Any:
    return parse_messages_request(
        {"model": "claude-x", "max_tokens": 12, "system": "You are terse. " * 20, "messages": messages}
    )


def test_saves_follow_the_contract_and_the_next_turn_extends_them(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    cache = Recording()
    r = Renderer(tok)
    engine = Engine(model, tok, cache, prefill_chunk=16, on_output=r.remember_output)
    engine.start()
    try:
        first = [{"role": "user", "content": "hello"}]
        p1 = r.render(body(first))
        restored, fin = run(engine, p1)
        assert restored == 0
        kinds = [k for k, _, _ in cache.saves]
        assert kinds == ["checkpoint", "prompt", "generation"]
        (_, ck, ck_off), (_, pr, pr_off), (_, gen, gen_off) = cache.saves
        assert ck == p1.tokens[: p1.prefix_end] and ck_off == len(ck)
        assert pr == p1.tokens and pr_off == len(pr)
        assert (
            gen[: len(p1.tokens)] == p1.tokens
            and len(gen) == len(p1.tokens) + fin.output_tokens - 1
            and gen_off == len(gen)
        )
        text = fin.blocks[0]["text"]
        p2 = r.render(body(first + [{"role": "assistant", "content": text}, {"role": "user", "content": "more"}]))
        # The model's own turn renders back to exactly the tokens it generated.
        assert p2.tokens[: len(gen)] == gen
    finally:
        engine.stop()


def test_restored_prefix_gives_the_same_output(loaded: tuple[Any, Any]) -> None:
    model, tok = loaded
    r = Renderer(tok)
    first = [{"role": "user", "content": "hello"}]
    p1 = r.render(body(first))

    plain = Engine(model, tok, NoCache(), on_output=r.remember_output)
    plain.start()
    cached_cache = Recording(restore_from_last=True)
    cached = Engine(model, tok, cached_cache, prefill_chunk=16)
    cached.start()
    try:
        _, f1 = run(plain, p1)
        _, g1 = run(cached, p1)
        assert g1.blocks == f1.blocks
        p2 = r.render(
            body(first + [{"role": "assistant", "content": f1.blocks[0]["text"]}, {"role": "user", "content": "more"}])
        )
        _, f2 = run(plain, p2)
        restored, g2 = run(cached, p2)
        assert restored == len(p1.tokens) + f1.output_tokens - 1
        assert g2.blocks == f2.blocks and g2.n_restored == restored
        # Exact hit: the whole prompt is cached; the engine must feed one token again.
        run(cached, p2)
        restored, g3 = run(cached, p2)
        assert restored == len(p2.tokens) - 1
        assert g3.blocks == f2.blocks
    finally:
        plain.stop()
        cached.stop()


def test_incremental_detokenizer_joins_to_decode(loaded: tuple[Any, Any]) -> None:
    _, tok = loaded
    text = " Hello wörld 🙂 — «ok»\n\ttabs"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.finish()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert pieces[0] == " Hello"  # a leading space is kept


class KeepsPartial(NoCache):
    """Keeps the last 'partial' save (with every layer's offset) and restores it once."""

    def __init__(self) -> None:
        self.partial: tuple[list[int], list[Any]] | None = None
        self.offsets: list[int] = []

    def restore(self, model: Any, prompt: RenderedPrompt) -> Restored:
        if self.partial is not None:
            tokens, cache = self.partial
            self.partial = None
            return Restored(cache, len(tokens), resumed=True)
        return Restored(make_prompt_cache(model), 0)

    def save(self, tokens: Any, cache: list[Any], kind: Any) -> None:
        if kind == "partial":
            self.partial = (list(tokens), cache)
            self.offsets = [c.offset for c in cache]


def test_a_cancel_between_layers_keeps_a_consistent_prefix_and_resumes_exactly(loaded: tuple[Any, Any]) -> None:
    """cpu_attention checks for a cancel before each layer: a pass stopped at layer 2 of a chunk
    leaves layer 1 one chunk ahead; the engine trims it back, keeps the prefix up to the chunk's
    start, and the resumed request answers as an unbroken one."""
    import mlx_lm.models.llama as llama

    from cache_backend import cpu_attention

    model, tokenizer = loaded
    prompt = RenderedPrompt(
        tokens=[(7 * i) % 900 + 20 for i in range(300)], prefix_end=0, message_ends=(), generation_start=300
    )
    assert cpu_attention.install(model, "numpy").startswith("numpy")
    unbroken = Engine(model, tokenizer, NoCache())
    unbroken.start()
    try:
        _, expected = run(unbroken, prompt)
    finally:
        unbroken.stop()

    store = KeepsPartial()
    engine = Engine(model, tokenizer, store, prefill_chunk=64)
    job_box: dict[str, Job] = {}

    def cancelling_attention(queries: Any, keys: Any, *args: Any, **kwargs: Any) -> Any:
        if keys.shape[2] == 160 and "job" in job_box:  # the 3rd chunk (tokens 96-160), first layer
            job_box["job"].cancel.set()
        return cpu_attention.attention(queries, keys, *args, **kwargs)

    llama.scaled_dot_product_attention = cancelling_attention
    engine.start()
    try:
        done = threading.Event()
        ends: list[Any] = []
        job = Job(
            prompt=prompt,
            params=GenerationParams(max_tokens=12, temperature=0.0),
            sink=lambda ev: (ends.append(ev), done.set()) if isinstance(ev, (Finished, Failed)) else None,
        )
        job_box["job"] = job
        engine.submit(job)
        deadline = 60
        while not store.offsets and deadline > 0:
            threading.Event().wait(0.05)
            deadline -= 0.05
        assert store.partial is not None, "the cancelled prefill kept nothing"
        kept = len(store.partial[0])
        # Chunks of 32, 64, 64: stopped in the third's first layer (which already holds it), the
        # prefix ends where that chunk began; a check only between chunks would have kept 160.
        assert kept == 96 and store.offsets == [kept] * len(store.offsets), (kept, store.offsets)
        llama.scaled_dot_product_attention = cpu_attention.attention
        restored, resumed = run(engine, prompt)
        assert restored == kept
        assert resumed.output_tokens == expected.output_tokens and resumed.blocks == expected.blocks
    finally:
        engine.stop()
        cpu_attention.install(model, "mlx")


def test_rewind_keeps_only_what_every_layer_can_give_back() -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    from cache_backend.prefill import rewind

    def layer(n: int) -> KVCache:
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 2, n, 4)), mx.zeros((1, 2, n, 4)))
        return c

    ahead, behind = layer(96), layer(64)
    assert rewind([ahead, behind], 64) and ahead.offset == behind.offset == 64
    # Recurrent (SSM) state has no offset: whether it took the chunk cannot be told, so no prefix.
    assert not rewind([layer(96), ArraysCache(size=2)], 64)
