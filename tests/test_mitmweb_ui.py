"""mitmweb itself with normalize + stability, its UI driven by headless Chromium.

Requests with a rotating `cch` go through mitmweb with normalize switched off, so every request
after the first breaks the prefix; the flow list must show them marked with their comments, and
the Claude Code content view must show the diff. Screenshot: artifacts/mitmweb.png.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

import httpx
import pytest

from ccwarm.harness import REPO, free_port, mitmproxy_process
from ccwarm.testing.synthetic import SessionGenerator, SessionSpec
from ccwarm.testing.upstream import RecordingUpstream

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = REPO / "artifacts" / "mitmweb.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)"
    ),
]


@contextlib.contextmanager
def mitmweb(upstream_port: int, tmp: Path, token: str):
    web_port = free_port()
    columns = [
        x
        for c in ("icon", "path", "method", "status", "size", "time", "comment")
        for x in ("--set", f"web_columns={c}")
    ]
    args = ("--web-host", "127.0.0.1", "--web-port", str(web_port), "--no-web-open-browser", *columns)
    with mitmproxy_process(
        upstream_port,
        "addons/normalize.py",
        "addons/stability.py",
        tool="mitmweb",
        options=(f"web_password={token}", "normalize=false"),
        extra_args=args,
        log=tmp / "mitmweb.log",
        also_wait_for=(web_port,),
    ) as (port, log):
        yield port, web_port, log


def test_flagged_flows_and_comments_are_visible_in_mitmweb(tmp_path) -> None:
    from playwright.sync_api import expect, sync_playwright

    token = secrets.token_hex(12)
    requests = SessionGenerator(SessionSpec(turns=4)).main_turns()
    upstream = RecordingUpstream()
    upstream.release.set()  # stream replies straight through
    with upstream.serve(), mitmweb(upstream.port, tmp_path, token) as (port, web_port, log):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for i, r in enumerate(requests):
                r.body["stream"] = i % 2 == 1  # streamed and plain replies
                with client.stream("POST", "/v1/messages?beta=true", content=r.raw(), headers=r.headers) as reply:
                    reply.raise_for_status()
                    reply.read()
        assert len(upstream.requests) == 4
        assert all(b"x-anthropic-billing-header" in rec.body for rec in upstream.requests)  # normalize is off

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 950})
                page.goto(f"http://127.0.0.1:{web_port}/?token={token}")
                rows = page.locator(".flow-table tbody tr.has-request")
                expect(rows).to_have_count(4, timeout=15_000)
                comments = page.locator(".flow-table td.col-comment")
                expect(comments.filter(has_text="prefix break at system[0].text")).to_have_count(3)
                markers = page.locator(".flow-table td.col-path .marker")
                assert [m.strip() for m in markers.all_inner_texts()] == ["", "⚠", "⚠", "⚠"]
                texts = comments.all_inner_texts()
                assert texts[0] == "" and all("billing header changed: cch " in t for t in texts[1:])

                rows.nth(3).click()  # the detail pane: our content view is picked for the request
                view = page.locator(".contentview")
                expect(view).to_contain_text("PREFIX BREAKS (1):", timeout=10_000)
                expect(view).to_contain_text("Claude Code request: model claude-opus-4-8")
                expect(page.locator(".contentview .view-options, .contentview")).to_contain_text("Claude Code")
                ARTIFACT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACT), full_page=True)
                page.get_by_text("Comment", exact=True).last.click()
                expect(page.locator("body")).to_contain_text("billing header changed: cch")
            finally:
                browser.close()
    warnings = [line for line in log.read_text().splitlines() if "stability:" in line and "prefix break" in line]
    assert len(warnings) == 3
    assert ARTIFACT.stat().st_size > 10_000
