"""Reward specs, and the scoring pool's time limits in the main thread, worker threads and Ray actors."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rewards
from rewards import SpecError, parse_spec, parse_specs
from rewards.pool import RayScoringPool, ScoringPool, call_with_timeout

ROOT = Path(__file__).resolve().parents[2]


SLEEPY = "tests.rewards.helper_scorers:sleepy"
CRASHY = "tests.rewards.helper_scorers:crashy"


def test_spec_composition():
    spec = parse_spec("math", {"correct": 1.0, "language": 0.1, "length": {"scorer": "length", "weight": 0.5, "args": {"per_token": 0.1}}})
    assert [(d.name, d.scorer, d.weight) for d in spec.dimensions] == [
        ("correct", "math", 1.0), ("language", "language_consistency", 0.1), ("length", "length", 0.5)]
    assert spec.combine({"correct": 1.0, "language": 0.5, "length": -0.2}) == pytest.approx(1.0 + 0.05 - 0.1)
    assert spec.combine({"correct": 1.0, "language": None, "length": -0.2}) == pytest.approx(0.9)  # aux abstains
    assert spec.combine({"correct": None, "language": 1.0, "length": 0.0}) is None  # primary abstains


@pytest.mark.parametrize(
    "raw,msg",
    [
        ({"math": {"corect": 1.0}}, r"rewards.math.corect: Unsupported scorer 'corect'. Supported: \["),
        ({"m": {"c": {"scorer": "nope.mod:fn"}}}, r"rewards.m.c: scorer 'nope.mod:fn': cannot import fn from nope.mod"),
        ({"math": {"correct": {"weight": "high"}}}, r"rewards.math.correct.weight: expected a number, got 'high'"),
        ({"math": {"correct": {"wieght": 1}}}, r"rewards.math.correct: unknown keys \['wieght'\]"),
        ({"math": {}}, r"rewards.math: expected a non-empty mapping"),
        ({"math": {"correct": 1.0, "primary": "style"}}, r"rewards.math.primary: 'style' is not one of"),
    ],
)
def test_spec_errors_name_the_key(raw, msg):
    with pytest.raises(SpecError, match=msg):
        parse_specs(raw)


def test_call_with_timeout_kills_and_reports():
    t0 = time.monotonic()
    res = call_with_timeout(time.sleep, (60,), {}, 0.5)
    assert not res.ok and res.error == "timeout" and time.monotonic() - t0 < 3
    assert call_with_timeout(sum, ([1, 2],), {}, 5).value == 3


def _score_hung_batch(pool):
    spec = parse_spec("t", {"len": {"scorer": SLEEPY}})
    return pool.score(spec, ["ab", "hang", "abcd"], {})


def test_timeout_isolates_the_culprit_in_main_thread():
    rewards.take_events()
    t0 = time.monotonic()
    out = _score_hung_batch(ScoringPool(timeout_s=0.5))
    assert [v["len"] for v in out] == [2.0, None, 4.0]
    assert rewards.take_events() == {f"{SLEEPY}:timeout": 1}
    assert time.monotonic() - t0 < 6


def test_every_dimension_failing_at_once_does_not_deadlock_the_pool():
    """More failing dimensions than the pool has threads: each falls back to one child per completion, in
    threads of its own (in the pool's, queued behind the waiting dimensions, they never ran)."""
    spec = parse_spec("t", {f"d{i}": {"scorer": CRASHY} for i in range(3)})
    result: dict = {}
    th = threading.Thread(target=lambda: result.setdefault("out", ScoringPool(timeout_s=5, threads=2).score(spec, ["a", "boom", "b"], {})))
    th.start()
    th.join(60)
    assert not th.is_alive(), "the scoring pool deadlocked"
    assert [[v[f"d{i}"] for i in range(3)] for v in result["out"]] == [[1.0] * 3, [None] * 3, [1.0] * 3]


def test_timeout_works_in_a_worker_thread():
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("out", _score_hung_batch(ScoringPool(timeout_s=0.5))))
    th.start()
    th.join(30)
    assert not th.is_alive() and [v["len"] for v in result["out"]] == [2.0, None, 4.0]


def test_concurrent_scoring_counts_its_own_events():
    """Two scoring calls at once (the training step's and an evaluation thread's): each collect_events()
    sees exactly its own events, including those counted in the pool's threads and forked children, and the
    process-wide counter sees none of them."""
    rewards.take_events()
    spec = parse_spec("t", {"x": {"scorer": CRASHY}})
    pool, got = ScoringPool(timeout_s=5), {}
    barrier = threading.Barrier(2)

    def run(name: str, completions: list[str]) -> None:
        with rewards.collect_events() as events:
            barrier.wait()
            pool.score(spec, completions, {})
        got[name] = dict(events)

    threads = [threading.Thread(target=run, args=("train", ["a", "boom", "boom"])), threading.Thread(target=run, args=("eval", ["boom"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == {"train": {f"{CRASHY}:exception": 2}, "eval": {f"{CRASHY}:exception": 1}}
    assert rewards.take_events() == {}


def test_scorer_exception_is_none_and_counted():
    rewards.take_events()
    spec = parse_spec("t", {"x": {"scorer": CRASHY}})
    assert [v["x"] for v in ScoringPool(timeout_s=5).score(spec, ["a", "boom"], {})] == [1.0, None]
    assert rewards.take_events() == {f"{CRASHY}:exception": 1}


def test_first_traceback_is_shown_once_with_the_scorer_name(capfd, monkeypatch):
    import rewards.pool

    monkeypatch.setattr(rewards.pool, "_SHOWN", set())
    spec = parse_spec("t", {"x": {"scorer": CRASHY}})
    pool = ScoringPool(timeout_s=5)
    assert [v["x"] for v in pool.score(spec, ["boom", "a", "boom"], {})] == [None, 1.0, None]
    assert [v["x"] for v in pool.score(spec, ["boom"], {})] == [None]
    err = capfd.readouterr().err
    assert err.count("Traceback (most recent call last)") == 1 and err.count("RuntimeError: scorer bug") == 1
    assert f"rewards: scorer '{CRASHY}' raised; its completions get None (abstain), counted as events/{CRASHY}:exception" in err
    assert 'helper_scorers.py", line' in err  # the user's own frame, not only the pool's
    rewards.take_events()


def test_trl_reward_functions_run_unchanged():
    """TRL's call: keyword prompts, completions, completion_ids and the dataset's columns; ours still works,
    and a function without **kwargs gets only the fields it names."""
    import math

    rows = {"prompt": ["1+1?", "2+2?"], "prompts": [[{"role": "user", "content": "1+1?"}], "2+2?"],
            "completion_ids": [[5, 6], [7]], "solution": ["2", "4"], "answer": ["2", "5"], "num_tokens": [2, 1]}
    spec = parse_spec("t", {"trl": {"scorer": "tests.rewards.helper_scorers:trl_reward"},
                            "len": {"scorer": "tests.rewards.helper_scorers:trl_len_reward"},
                            "strict": {"scorer": "tests.rewards.helper_scorers:strict_reward"},
                            "exact": 1.0})
    rewards.take_events()
    out = ScoringPool(timeout_s=5).score(spec, ["2", "3"], rows)
    assert rewards.take_events() == {}
    assert [v["trl"] for v in out] == [pytest.approx(1 + 0.02 + 0.001), pytest.approx(0 + 0.01 + 0.004)]  # len(messages)=1
    assert [v["len"] for v in out] == [-19.0, -19.0] and [v["strict"] for v in out] == [1.0, 0.0]
    assert [v["exact"] for v in out] == [1.0, 0.0]
    # `prompts` defaults to the `prompt` row field (rows scored outside the pipeline, `python -m rewards`).
    trl = rewards.get_scorer("tests.rewards.helper_scorers:trl_reward")
    got = rewards.call_scorer("trl", trl, ["2"], prompt=["1+1?"], completion_ids=[[5]], solution=["2"])
    assert math.isclose(got[0], 1 + 0.01 + 0.004)


def test_events_from_child_processes_reach_the_parent():
    rewards.take_events()
    spec = parse_spec("math", {"correct": 1.0})
    ScoringPool(timeout_s=5).score(spec, ["\\boxed{1}"], {"answer": [""]})
    assert rewards.take_events() == {"math:unparsable_gold": 1}


def test_contract_violation_raises_through_the_pool():
    spec = parse_spec("math", {"correct": 1.0})
    with pytest.raises(rewards.ScorerError, match="row field 'answer' must be a list of 2"):
        ScoringPool(timeout_s=5).score(spec, ["a", "b"], {"answer": ["1"]})


def test_timeout_inside_ray_actors(ray_cluster):
    rewards.take_events()
    pool = RayScoringPool(num_actors=2, timeout_s=0.5, num_cpus=0.25)
    # Actors find a user's scorer by import path (the registry of this process is not theirs).
    spec = parse_spec("t", {"len": {"scorer": SLEEPY}, "correct": {"scorer": "exact"}})
    out = pool.score(spec, ["ab", "hang", "abc", "\\boxed{4}"], {"answer": ["ab", "x", "y", "4"]})
    assert [v["len"] for v in out] == [2.0, None, 3.0, 9.0]
    assert [v["correct"] for v in out] == [1.0, 0.0, 0.0, 1.0]
    assert rewards.take_events() == {f"{SLEEPY}:timeout": 1}


def test_cli_scores_the_example_file():
    cmd = [sys.executable, "-m", "rewards", "score", "--spec", "examples/rewards/spec.yaml", "examples/rewards/math.jsonl"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "row 1: reward=1.200 correct=1.000 format=1.000 language=None length=0.000" in out
    assert "row 3: reward=0.257 correct=0.000 format=1.000 language=0.571" in out
    assert "events: language_consistency:no_words=1" in out


def test_cli_bad_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "x", "answer": "1"}\n{"answer": "2"}\n')
    res = subprocess.run([sys.executable, "-m", "rewards", "score", "--spec", "math", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0 and f"{bad}:2: each row needs a string field 'completion'" in res.stderr


def test_fork_refused_for_a_moment_is_retried(monkeypatch):
    """filelock's fork-safety audit hook refuses os.fork during a lock hand-over in another thread (seen on
    the GPU machine, filelock 3.32): the pool tries again instead of failing the step."""
    import os

    from rewards.pool import call_with_timeout

    real_fork, refusals = os.fork, iter([True, True])

    def flaky_fork():
        if next(refusals, False):
            raise RuntimeError("os.fork is unsafe while filelock is changing descriptor ownership")
        return real_fork()

    monkeypatch.setattr(os, "fork", flaky_fork)
    res = call_with_timeout(sum, ([1, 2, 3],), {}, timeout_s=10)
    assert res.ok and res.value == 6
    monkeypatch.setattr(os, "fork", lambda: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        call_with_timeout(sum, ([1],), {}, timeout_s=10)


def test_prestarted_process_serves_batches_and_is_replaced_when_it_overruns():
    """One process per scorer serves batch after batch (no fork per step); one that overruns is killed, only
    the culprit gets None, and the next batch gets a new process."""
    import os
    import signal
    import time

    spec = parse_spec("t", {"p": {"scorer": "tests.rewards.helper_scorers:pid"}})
    pool = ScoringPool(timeout_s=0.5)
    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # as rl.train's Stop: the children must not inherit it
    try:
        first = {v["p"] for v in pool.score(spec, ["a", "b"], {})}
        assert len(first) == 1 and first != {float(os.getpid())}
        assert {v["p"] for v in pool.score(spec, ["c"], {})} == first  # the same process
        out = [v["p"] for v in pool.score(spec, ["d", "hang", "e"], {})]
        assert out[1] is None and None not in (out[0], out[2])
        later = {v["p"] for v in pool.score(spec, ["f"], {})}
        assert later != first and not os.path.exists(f"/proc/{int(first.pop())}")  # killed, replaced
        os.kill(int(next(iter(later))), signal.SIGTERM)  # what multiprocessing sends its daemons at exit
        time.sleep(0.5)
        assert {v["p"] for v in pool.score(spec, ["g"], {})} != later  # it died; a new one scored this
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.close()


def test_a_prestarted_process_that_dies_is_seen_at_once():
    """A scorer process that dies mid-batch is reported as crashed within a second or so, not after the batch's
    time limit (other forks may hold copies of its pipe, so no EOF arrives), and only the culprit gets None."""
    import time

    spec = parse_spec("t", {"e": {"scorer": "tests.rewards.helper_scorers:exits"}})
    pool = ScoringPool(timeout_s=30)
    try:
        rewards.take_events()
        t0 = time.monotonic()
        assert [v["e"] for v in pool.score(spec, ["a", "die", "b"], {})] == [1.0, None, 1.0]
        assert time.monotonic() - t0 < 15  # the batch's limit is 90 s, a completion's 30 s
        assert rewards.take_events() == {"tests.rewards.helper_scorers:exits:crashed": 1}
        assert [v["e"] for v in pool.score(spec, ["c"], {})] == [1.0]
    finally:
        pool.close()


def test_a_prestarted_process_is_replaced_after_max_batches(monkeypatch):
    """A process serves at most MAX_BATCHES batches (what it carries from step to step stays bounded)."""
    import rewards.pool as pool_module

    monkeypatch.setattr(pool_module, "MAX_BATCHES", 2)
    spec = parse_spec("t", {"p": {"scorer": "tests.rewards.helper_scorers:pid"}})
    pool = ScoringPool(timeout_s=5)
    try:
        pids = [pool.score(spec, [c], {})[0]["p"] for c in "abcd"]
        assert pids[0] == pids[1] != pids[2] == pids[3]
    finally:
        pool.close()
