"""One whole session of the current Claude Code CLI, in the order the CLI sends its requests: main
turns with a Bash call and its classifier checks, ToolSearch loading and calling WebFetch, a
background sub-agent reporting back, then /compact and one more turn. A fixed scenario kept apart
from the per-request builders (synthetic_current_requests.py), so tests get every shape in one list
while benchmarks and the soak compose their own conversations from the same builders.
"""

from __future__ import annotations

from ccwarm.testing.synthetic import Request, text_of_size
from ccwarm.testing.synthetic_current_requests import CurrentRequests


class CurrentSession(CurrentRequests):
    """The builders plus `session()`, the scripted sequence of one session's requests."""

    def session(self) -> list[Request]:
        """Main turns (text, Bash, ToolSearch loading WebFetch and calling it, a background sub-agent
        reporting back, classifier checks around the tool calls), then /compact and one more turn."""
        out: list[Request] = []
        msgs = self.start("Look at the project and tell me what the build does.")
        out.append(self.main(msgs, "main 1", first=True))
        msgs += [
            {"role": "assistant", "content": [{"type": "text", "text": "It builds with make."}]},
            {"role": "user", "content": "Run the tests."},
            {"role": "system", "content": "While bypass permissions mode is active: " + text_of_size(self.rng, 400)},
        ]
        out.append(self.main(msgs, "main 2"))
        msgs.append(self.tool_use("toolu_bash1", "Bash", {"command": "make test", "description": "Run tests"}))
        out.append(self.classifier([{"user": "Run the tests."}, {"Bash": "make test"}], 1, "classifier 1"))
        out.append(self.classifier([{"user": "Run the tests."}, {"Bash": "make test"}], 2, "classifier 2"))
        msgs.append(self.tool_result("toolu_bash1", text_of_size(self.rng, 1500)))
        out.append(self.main(msgs, "main 3"))
        msgs += [
            {"role": "assistant", "content": [{"type": "text", "text": "Tests pass."}]},
            {"role": "user", "content": "Fetch the docs page."},
        ]
        out.append(self.main(msgs, "main 4"))
        call, result = self.tool_search("toolu_search1", "WebFetch")
        msgs += [call, result]
        out.append(self.main(msgs, "main 5 (WebFetch loaded)"))
        msgs.append(self.tool_use("toolu_fetch1", "WebFetch", {"url": "https://example.invalid/docs"}))
        out.append(
            self.classifier(
                [{"user": "Fetch the docs page."}, {"WebFetch": "https://example.invalid/docs"}], 1, "classifier 3"
            )
        )
        msgs.append(self.tool_result("toolu_fetch1", text_of_size(self.rng, 2500)))
        out.append(self.main(msgs, "main 6 (WebFetch called)"))
        msgs += [
            self.tool_use(
                "toolu_agent1",
                "Agent",
                {
                    "description": "Read notes",
                    "prompt": "Read notes.txt and summarise it",
                    "subagent_type": "general-purpose",
                    "run_in_background": True,
                },
            ),
            self.tool_result("toolu_agent1", [{"type": "text", "text": "Async agent launched successfully."}]),
        ]
        out.append(self.main(msgs, "main 7 (agent launched)"))
        out += self.subagent("Read notes.txt and summarise it")
        msgs += [
            {"role": "assistant", "content": [{"type": "text", "text": "Waiting for the agent."}]},
            self.task_notification("agent1", "toolu_agent1", "The notes describe the build."),
        ]
        out.append(self.main(msgs, "main 8 (task notification)"))
        msgs.append(
            {"role": "assistant", "content": [{"type": "text", "text": "The agent says the notes describe the build."}]}
        )
        msgs.append({"role": "user", "content": "Thanks."})
        out.append(self.compaction(msgs))
        after = self.after_compaction("The user asked about the build; tests pass.", "What next?")
        self._main_suffix = self.suffix(after[0]["content"])
        out.append(self.main(after, "main after compact"))
        return out
