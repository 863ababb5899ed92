"""rl.train.Prefetcher: the one scheduling decision of the loop (sync, async with a staleness bound)."""
from __future__ import annotations

import threading
import time

import pytest

from rl.train import Prefetcher, Stop


def _run(mode: str, depth: int, steps: int = 8):
    """The loop's calls to the prefetcher, with a fake two-stage collection that records the policy version
    (weights synced so far) and the newest step asked for when its generation starts, and the scoring stage's
    thread. "Training" lasts until every queued collection has started (the slowest case for staleness)."""
    state = {"version": 0, "asked": -1}
    started, scored_in, lock = {}, set(), threading.Lock()

    def generate(k):
        with lock:
            started[k] = (state["version"], state["asked"])
        return k

    def score(k):
        scored_in.add(threading.current_thread().name.split("_")[0])
        return k

    stop = Stop()
    p = Prefetcher(generate, mode, steps, stop, depth, finish_fn=score)
    p.start(0)
    for step in range(steps):
        state["asked"] = step
        assert p.take(step) == step
        while len(started) < p.queued:  # train
            time.sleep(0.001)
        state["version"] = step + 1  # sync
        p.weights_synced(step)
    p.close()
    assert scored_in == {"score"}  # never in the generation thread: the engines do not wait for scoring
    return started


def test_sync_collects_on_policy():
    started = _run("sync", depth=1)
    assert all(version == k for k, (version, _) in started.items())


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_async_runs_ahead_by_at_most_the_staleness_bound(depth):
    started = _run("async", depth)
    assert sorted(started) == list(range(8))
    stale = {k: k - version for k, (version, _) in started.items()}
    assert max(stale.values()) == depth, stale  # collection ran ahead as far as allowed (and never further)
    assert all(k - asked <= depth + 1 for k, (_, asked) in started.items())  # queued at the sync before the ask


@pytest.mark.parametrize("mode,depth", [("sync", 1), ("async", 1), ("async", 2)])
def test_the_next_collections_are_queued_when_the_weights_arrive(mode, depth):
    """Not at the next `take`: between the sync and it the loop evaluates, logs and checkpoints, and the
    engines would idle through that (async with staleness 1: every step)."""
    p = Prefetcher(lambda k: k, mode, 10, Stop(), depth)
    p.start(0)
    assert p.take(0) == 0
    p.weights_synced(0)  # version 1 on the engines
    assert p.queued == (2 if mode == "sync" else 2 + depth)  # sync: step 1; async: up to step 1 + depth
    p.close()


def test_a_signal_queues_nothing_more():
    stop = Stop()
    p = Prefetcher(lambda k: k, "async", 10, stop, 3)
    p.start(0)
    assert p.take(0) == 0 and len(p.pending) == 3
    stop.signum = 15
    p.take(1)
    assert p.queued == 4  # nothing new after the signal
    p.close()
