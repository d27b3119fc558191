"""A session in the current CLI's shape for the KV-store benchmark, replayed as recorded.

The main thread grows to 60k+ tokens through large tool results; two background sub-agents run
between main turns; six auto-mode classifier checks (a ~33k-token system prompt each, the
transcript growing at the end) share their prefix with one another. The assistant turns are the
recorded ones, never the server's answers, so each generation leaves a dead branch behind, as in
any replay. Requests do not depend on answers: the whole list is built up front, the same for
every variant a benchmark compares.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ccwarm.testing.synthetic import Request, text_of_size
from ccwarm.testing.synthetic_current_requests import CurrentRequests, CurrentSpec


@dataclass(frozen=True)
class CurrentReplaySpec:
    main_turns: int = 18
    extra_main_turns: int = 3  # held back: sent one by one after server restarts
    result_bytes: int = 20_000  # each main turn's tool result (~5k tokens)
    classifier_after: tuple[int, ...] = (2, 4, 6, 8, 10, 12)
    subagent_after: tuple[int, ...] = (3, 7)  # each launches a sub-agent whose two turns follow
    max_tokens: int = 32
    seed: int = 11


@dataclass(frozen=True)
class Step:
    kind: str  # main, subagent or classifier
    request: Request


def current_session(spec: CurrentReplaySpec) -> tuple[list[Step], list[Step]]:
    """(the session's requests in order, the held-back main turns for after restarts)."""
    s = CurrentRequests(CurrentSpec(seed=spec.seed, interactive=True))
    rng = random.Random(spec.seed)
    msgs = s.start("Look at the project and tell me what the build does.")
    transcript: list[dict[str, str]] = [{"user": "Look at the project and tell me what the build does."}]
    steps: list[Step] = []
    subagent_turns: list[Request] = []
    classifiers = 0
    for turn in range(1, spec.main_turns + spec.extra_main_turns + 1):
        steps.append(Step("main", _capped(s.main(msgs, f"main {turn}", first=turn == 1), spec.max_tokens)))
        if subagent_turns:
            steps.append(Step("subagent", _capped(subagent_turns.pop(0), spec.max_tokens)))
        tool_id = f"toolu_main{turn:04d}"
        path = f"src/module_{turn}.py"
        msgs = msgs + [s.tool_use(tool_id, "Read", {"file_path": path}, text=f"Reading {path}.")]
        transcript.append({"Read": path})
        if turn in spec.classifier_after:
            classifiers += 1
            req = s.classifier(transcript, stage=1 + classifiers % 2, label=f"classifier {classifiers}")
            steps.append(Step("classifier", _capped(req, 16)))
        if turn in spec.subagent_after:
            subagent_turns += s.subagent(f"Survey the code reached from {path} and report.", turns=2)
        msgs = msgs + [s.tool_result(tool_id, text_of_size(rng, spec.result_bytes))]
    mains = [i for i, st in enumerate(steps) if st.kind == "main"]
    cut = mains[spec.main_turns] if spec.extra_main_turns else len(steps)
    return steps[:cut], [st for st in steps[cut:] if st.kind == "main"]


def _capped(req: Request, max_tokens: int) -> Request:
    return Request(body=dict(req.body, max_tokens=max_tokens), headers=req.headers, label=req.label)
