"""scripts/capture_diff.py on a capture written by a real `mitmdump -s normalize -s stability -w FILE`,
and on folders of JSON bodies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mitmproxy import io

from ccwarm import flowmeta
from ccwarm.harness import REPO, mitmdump
from ccwarm.testing.synthetic import Request, SessionGenerator, SessionSpec
from ccwarm.testing.upstream import RecordingUpstream

SCRIPT = str(REPO / "scripts" / "capture_diff.py")
SECRET = "sk-ant-test-secret"
DATE_OLD, DATE_NEW = "2026-11-22", "2026-11-23"


def drifted_session() -> list[Request]:
    """Main turns with drift, a title side request and a sub-agent interleaved (see ccwarm.synthetic)."""
    requests = SessionGenerator(SessionSpec(turns=7)).session()
    mains = [r for r in requests if r.label.startswith("main")]
    for r in mains[2:]:
        block = r.body["messages"][0]["content"][0]
        block["text"] = block["text"].replace(DATE_OLD, DATE_NEW)
    for r in mains[4:]:
        r.body["tools"] = r.body["tools"][-2:] + r.body["tools"][:-2]
    for r in mains[5:]:
        r.body["messages"].insert(1, {"role": "system", "content": "Plan mode is on. <b>&amp;</b>"})
    return requests


def capture_diff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("capture")
    flows = tmp / "session.flows"
    # Like a model server, the upstream takes a while (0.1 s) on each streamed reply: the diff runs
    # meanwhile, so the flags are on each flow before it completes and is saved.
    upstream = RecordingUpstream(hold_seconds=0.1, hold_always=True)
    with (
        upstream.serve(),
        mitmdump(
            upstream.port,
            "addons/normalize.py",
            "addons/stability.py",
            options=(f"save_stream_file={flows}",),
            log=tmp / "mitmdump.log",
        ) as (port, log),
    ):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for r in drifted_session():
                reply = client.post("/v1/messages?beta=true", content=r.raw(), headers=r.headers)
                reply.raise_for_status()
                assert "message_stop" in reply.text
            client.post(
                "/v1/messages/count_tokens?beta=true", content=b'{"messages": []}', headers={"x-api-key": SECRET}
            )
    assert len(upstream.requests) == 11
    return flows, log


def test_live_addon_flags_and_saves_the_breaks(capture) -> None:
    flows, log = capture
    text = log.read_text()
    warnings = [line for line in text.splitlines() if "stability:" in line and "prefix break" in line]
    assert len(warnings) == 3, text[-3000:]
    assert any("prefix break at messages[0].content[0].text" in w for w in warnings)
    assert any("prefix break at tools" in w and "re-ordered" in w for w in warnings)
    assert any("prefix break at messages[1]" in w and "role:system" in w for w in warnings)
    with flows.open("rb") as fo:
        saved = list(io.FlowReader(fo).stream())
    assert len(saved) == 11
    marked = [f for f in saved if f.marked]
    assert [f.marked for f in marked] == [":warning:"] * 3
    for f in marked:
        assert "prefix break at" in f.comment and f.comment.startswith("dropped system[0]: billing header")
        assert f.metadata[flowmeta.STABILITY_KEY]["prefix_breaks"]
        assert f.metadata[flowmeta.STABILITY_KEY]["normalize_dropped"][0]["where"] == "system[0]"


def test_json_report_of_the_capture(capture) -> None:
    flows, _ = capture
    proc = capture_diff(str(flows), "--json")
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout
    report = json.loads(proc.stdout)
    assert report["schema_version"] == 1 and report["input"]["complete"] is True
    assert report["input"]["requests_read"] == 10  # count_tokens is not diffed
    convs = {c["kind"]: c for c in report["conversations"]}
    assert set(convs) == {"main", "side", "subagent"}
    main = convs["main"]
    assert main["counts"]["requests"] == 7 and len(main["requests"]) == 7
    breaks = [[(b["path"], b["offset"] > 0) for b in r["prefix_breaks"]] for r in main["requests"]]
    assert breaks == [
        [],
        [],
        [("messages[0].content[0].text", True)],
        [],
        [("tools", False)],
        [("messages[1]", False)],
        [],
    ]
    date_break = main["requests"][2]["prefix_breaks"][0]
    assert date_break["excerpt"]["old"] == "2" and date_break["excerpt"]["new"] == "3"
    assert main["requests"][1]["compared_to"] == main["requests"][0]["source"]
    assert main["requests"][0]["headers"]["x-api-key"] == "[REDACTED]"
    assert convs["subagent"]["counts"]["prefix_breaks"] == 0 and convs["side"]["counts"]["requests"] == 1
    assert {v["block"] for v in report["volatile_blocks"]} == {"messages[0].content[0]", "tools", "messages[1]"}


def test_html_report_shows_spans_escaped_and_redacted(capture, tmp_path) -> None:
    flows, _ = capture
    page = tmp_path / "report.html"
    proc = capture_diff(str(flows), "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    assert "# Prompt prefix stability" in proc.stdout and SECRET not in proc.stdout
    html = page.read_text()
    assert (
        html.startswith("<!doctype html>")
        and "<script" not in html
        and "http://" not in html.replace("http://127.0.0.1", "")
    )
    assert "<del>2</del>" in html and "<ins>3</ins>" in html
    assert "Plan mode is on. &lt;b&gt;&amp;amp;&lt;/b&gt;" in html and "<b>&amp;</b>" not in html
    assert SECRET not in html


def test_truncated_flow_file_reports_what_it_read_and_fails(capture, tmp_path) -> None:
    flows, _ = capture
    data = flows.read_bytes()
    broken = tmp_path / "broken.flows"
    broken.write_bytes(data[: len(data) // 2])
    proc = capture_diff(str(broken), "--json")
    assert proc.returncode == 2
    assert "broken or truncated" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["input"]["complete"] is False and "truncated" in report["input"]["error"]
    assert 0 < report["input"]["requests_read"] < 10
    garbage = tmp_path / "garbage.flows"
    garbage.write_bytes(b"7:garbage,\x00\x01")
    assert capture_diff(str(garbage)).returncode == 2
    assert capture_diff(str(tmp_path / "missing.flows")).returncode == 1


def write_bodies(folder: Path, requests: list[Request], *, with_headers: bool) -> None:
    folder.mkdir()
    for i, r in enumerate(requests):
        (folder / f"{i:03d}.json").write_text(
            json.dumps({"headers": r.headers, "body": r.body}) if with_headers else json.dumps(r.body)
        )


@pytest.mark.parametrize("with_headers", [False, True])
def test_folder_of_bodies_with_and_without_normalize(tmp_path, with_headers) -> None:
    folder = tmp_path / "bodies"
    write_bodies(folder, SessionGenerator(SessionSpec(turns=6)).session(), with_headers=with_headers)
    (folder / "zzz.json").write_text("{broken")
    raw = capture_diff(str(folder), "--json", "--fail-on-break")
    assert raw.returncode == 3
    report = json.loads(raw.stdout)
    assert report["input"]["format"] == "json-folder"
    assert report["input"]["skipped"][0]["source"] == "zzz.json"
    assert report["totals"]["prefix_breaks"] == 6
    assert report["volatile_blocks"][0]["block"] == "system[0]"
    first = next(r for c in report["conversations"] for r in c["requests"] if r["prefix_breaks"])
    assert list(first["prefix_breaks"][0]["fields"]) == ["cch"]
    normalized = capture_diff(str(folder), "--json", "--normalize", "--fail-on-break")
    assert normalized.returncode == 0, normalized.stderr
    report = json.loads(normalized.stdout)
    assert report["normalize"] is True and report["totals"]["prefix_breaks"] == 0
    assert report["totals"]["compared"] == 6 and report["volatile_blocks"] == []
    assert all(
        r["normalize_dropped"][0]["where"] == "system[0]" for c in report["conversations"] for r in c["requests"]
    )
