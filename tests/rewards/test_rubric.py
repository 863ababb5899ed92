"""Rubric GenRM: judge-reply parsing, and the scorer against a real OpenAI-compatible vLLM server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import rewards
from rewards import get_scorer
from rewards.rubric import parse_judge_score


@pytest.mark.parametrize(
    "reply,score",
    [("Score: 7/10", 0.7), ("score = 3", 0.3), ("Final verdict [[10]]", 1.0), ("Score: 0.85", 0.85),
     ("Score: 4/5", 0.8), ("Score: 11/10", None), ("Score: -1/10", None), ("I think it's good", None), ("", None)],
)
def test_parse_judge_score(reply, score):
    got = parse_judge_score(reply, max_score=10)
    assert got == (pytest.approx(score) if score is not None else None)


def test_unreachable_judge_abstains_and_counts():
    rewards.take_events()
    out = get_scorer("rubric")(["x"], rubric=["be nice"], base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2)
    assert out == [None] and rewards.take_events() == {"rubric:request_error": 1}


def test_missing_endpoint_is_a_config_error():
    with pytest.raises(ValueError, match="set args.base_url and args.model"):
        get_scorer("rubric")(["x"], rubric=["r"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_server(tiny_dense):
    """`vllm serve` (the OpenAI-compatible server) on the tiny dense model, loopback only."""
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_dense, "--served-model-name",
           "judge", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "1024"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}")
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("vllm server did not come up in 180 s")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.mark.vllm
@pytest.mark.slow
def test_rubric_against_a_real_judge(judge_server):
    rewards.take_events()
    comps = ["<think>hmm</think> Paris is the capital.", "I refuse.", "Lyon"]
    rubric = ["Names Paris as the capital of France."] * 3
    prompts = ["What is the capital of France?"] * 3
    scorer = get_scorer("rubric")
    # Guided: the tiny judge is forced into the score format, so every reply parses into [0, 1].
    guided = scorer(comps, rubric=rubric, prompt=prompts, base_url=judge_server, model="judge", guided=True)
    assert all(s is not None and 0.0 <= s <= 1.0 for s in guided) and rewards.take_events() == {}
    # Unguided, a random-weight judge writes noise: every reply is a counted parse failure, never a 0.
    free = scorer(comps, rubric=rubric, prompt=prompts, base_url=judge_server, model="judge", max_tokens=8)
    assert free == [None, None, None] and rewards.take_events() == {"rubric:parse_failure": 3}


class _FakeJudge:
    """An OpenAI-compatible /chat/completions endpoint that answers after `delay` seconds and records the
    requests and the most it had in flight at once."""

    def __init__(self, delay: float):
        import threading

        from tests.rewards.helper_http import serve_json

        self.delay, self.requests, self.in_flight, self.peak = delay, [], 0, 0
        self._lock = threading.Lock()
        url, self.server = serve_json(self._respond)
        self.url = url + "/v1"

    def _respond(self, path: str, headers, body: dict) -> dict:
        with self._lock:
            self.requests.append((path, headers.get("Authorization"), body))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(self.delay)
        with self._lock:
            self.in_flight -= 1
        reply = "Score: 9/10" if "Paris" in body["messages"][0]["content"].split("# Response")[1] else "hmm"
        return {"id": "1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}]}


@pytest.fixture
def fake_judge():
    judge = _FakeJudge(delay=0.3)
    yield judge
    judge.server.shutdown()


def test_judge_requests_are_concurrent_and_bounded(fake_judge, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "sk-test")
    rewards.take_events()
    comps = ["<think>Lyon?</think> Paris", "Lyon", "Paris", "Marseille", "Paris!", "Nice"]
    t0 = time.monotonic()
    out = get_scorer("rubric")(comps, rubric=["Names Paris."] * 6, prompt=["Capital of France?"] * 6,
                               base_url=fake_judge.url, model="judge", max_concurrency=2, guided=True)
    took = time.monotonic() - t0
    assert out == [0.9, None, 0.9, None, 0.9, None] and rewards.take_events() == {"rubric:parse_failure": 3}
    assert fake_judge.peak == 2 and took < 6 * 0.3  # two at a time: concurrent, and never more than asked
    path, auth, body = fake_judge.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge"
    assert body["structured_outputs"]["regex"].startswith("Score: (10|9|8")  # vLLM's guided decoding field
    assert "Lyon?" not in "".join(r[2]["messages"][0]["content"] for r in fake_judge.requests)  # reasoning not judged


def test_judge_runs_inside_a_running_event_loop(fake_judge):
    import asyncio

    async def notebook_cell():
        return get_scorer("rubric")(["Paris"], rubric=["Names Paris."], base_url=fake_judge.url, model="judge")

    assert asyncio.run(notebook_cell()) == [0.9]
