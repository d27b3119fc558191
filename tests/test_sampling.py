"""Sampling defaults from the model's generation_config.json, for what a request leaves unset.

Units for reading the file (each bad value named with its file and key), then a real server on the
tiny model: with `temperature: 0` in the model's file, a request that sets no temperature answers
exactly as a greedy one, `--sampling api` goes back to the API's temperature 1, and a repetition
penalty in the file changes what greedy decoding picks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anthropic
import pytest
from server_helpers import ServerProcess

from cache_backend.sampling import GENERATION_CONFIG, SamplingDefaults
from ccwarm.harness import REPO, free_port


def _model_with(src: Path, dest: Path, **sampling: object) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / GENERATION_CONFIG).read_text())
    (dest / GENERATION_CONFIG).write_text(json.dumps({**config, **sampling}))
    return dest


def test_values_come_from_the_file_and_the_rest_from_the_api(tmp_path: Path) -> None:
    config = {"eos_token_id": 2, "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.05}
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps(config))
    found = SamplingDefaults.from_model_dir(tmp_path)
    assert (found.temperature, found.top_p, found.top_k, found.min_p) == (0.7, 0.0, 20, 0.0)
    assert found.repetition_penalty == 1.05
    assert found.describe() == (
        f"temperature 0.7, top_k 20, repetition_penalty 1.05 (from {tmp_path / GENERATION_CONFIG})"
    )


@pytest.mark.parametrize("content", [None, {"eos_token_id": 2}, {"temperature": None}])
def test_no_sampling_in_the_folder_means_the_apis_defaults(tmp_path: Path, content: object) -> None:
    if content is not None:
        (tmp_path / GENERATION_CONFIG).write_text(json.dumps(content))
    assert SamplingDefaults.from_model_dir(tmp_path) == SamplingDefaults()
    assert SamplingDefaults.from_model_dir(None) == SamplingDefaults()
    assert SamplingDefaults().describe() == "temperature 1 (from the Anthropic API's defaults)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"top_p": 1.5}', "top_p must be a number from 0 to 1, got 1.5"),
        ('{"temperature": "hot"}', "temperature must be a number from 0 to 2, got 'hot'"),
        ('{"temperature": true}', "temperature must be a number from 0 to 2, got True"),
        ('{"top_k": -1}', "top_k must be a non-negative integer, got -1"),
        ('{"top_k": 2.5}', "top_k must be a non-negative integer, got 2.5"),
        ('{"min_p": -0.1}', "min_p must be a number from 0 to 1, got -0.1"),
        ('{"repetition_penalty": 0.9}', "repetition_penalty must be a number from 1 to 2, got 0.9"),
        ("[1, 2]", "expected a JSON object, got list"),
        ("{not json", "not readable JSON"),
    ],
)
def test_a_bad_value_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / GENERATION_CONFIG).write_text(text)
    with pytest.raises(ValueError) as e:
        SamplingDefaults.from_model_dir(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / GENERATION_CONFIG}: ")
    assert message in str(e.value)


def _answer(client: anthropic.Anthropic, **extra: object) -> str:
    msg = client.messages.create(
        model="claude-test",
        max_tokens=24,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        **extra,  # type: ignore[arg-type]
    )
    return msg.content[0].text


def test_a_silent_request_samples_as_the_model_file_says(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _model_with(tiny_model_dir, tmp_path / "model", temperature=0.0)
    for mode in ("model", "api"):
        log = tmp_path / mode / "server.log"
        srv = ServerProcess(model, log, "--sampling", mode)
        try:
            client = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=60)
            greedy = _answer(client, extra_body={"temperature": 0.0})
            silent = [_answer(client) for _ in range(3)]
            sampled = [_answer(client, extra_body={"temperature": 1.0}) for _ in range(3)]
        finally:
            srv.stop()
        assert len(greedy) > 20
        # A temperature the request sets always wins over the file's.
        assert sampled != [greedy] * 3
        if mode == "model":
            assert silent == [greedy] * 3
            assert f"sampling where a request sets none: temperature 0 (from {model / GENERATION_CONFIG})" in (
                log.read_text()
            )
        else:
            assert silent != [greedy] * 3
            assert "sampling where a request sets none: temperature 1 (from the Anthropic API's defaults)" in (
                log.read_text()
            )


def test_a_repetition_penalty_in_the_file_changes_greedy_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    answers = {}
    for name, penalty in (("plain", 1.0), ("penalized", 1.5)):
        model = _model_with(tiny_model_dir, tmp_path / name, temperature=0.0, repetition_penalty=penalty)
        srv = ServerProcess(model, tmp_path / name / "server.log")
        try:
            client = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=60)
            answers[name] = [_answer(client) for _ in range(2)]
        finally:
            srv.stop()
    assert answers["plain"][0] == answers["plain"][1] and answers["penalized"][0] == answers["penalized"][1]
    assert answers["plain"] != answers["penalized"]
    assert "repetition_penalty 1.5 (from " in (tmp_path / "penalized" / "server.log").read_text()


def test_a_bad_generation_config_stops_the_server_with_its_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _model_with(tiny_model_dir, tmp_path / "model", top_p=1.5)
    proc = subprocess.run(
        [sys.executable, "-m", "cache_backend", "--model", str(model), "--port", str(free_port())]
        + ["--cache-dir", str(tmp_path / "cache")],
        cwd=REPO,
        env={**os.environ, "CCWARM_FAST_BLAS": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--sampling model: {model / GENERATION_CONFIG}: top_p must be a number from 0 to 1, got 1.5" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr
