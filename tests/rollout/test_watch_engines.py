"""The NCCL sync's liveness watch (rollout.weight_transfer.watch_engines), on CPU: an engine that dies while the
learner waits for a broadcast that can never finish ends the wait with SyncLost within seconds."""
import sys
import threading
import time

import pytest
import ray
from ray import cloudpickle

from rollout.manager import engine_broken
from rollout.weight_transfer import SyncLost, watch_engines

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor runs in workers that cannot import tests


class _Receiver:
    def receive(self, seconds):  # stands in for update_weights_from_nccl: blocked in the broadcast
        time.sleep(seconds)
        return 3


def test_dead_receiver_ends_the_wait(ray_cluster):
    a, b = [ray.remote(num_cpus=0)(_Receiver).remote() for _ in range(2)]
    refs = [a.receive.remote(60), b.receive.remote(60)]
    threading.Timer(1.0, lambda: ray.kill(b)).start()
    t0 = time.time()
    with pytest.raises(SyncLost, match=r"engine 1 died or failed during the NCCL weight sync to version 7 \(ActorDiedError\)"):
        watch_engines(refs, done=lambda: False, version=7)  # a kernel that never completes
    assert time.time() - t0 < 10
    with pytest.raises(SyncLost, match="engine 1"):  # finish: waiting for every receiver
        watch_engines(refs, version=7)
    ray.kill(a)


def test_returns_when_done_or_when_all_received(ray_cluster):
    a = ray.remote(num_cpus=0)(_Receiver).remote()
    ref = a.receive.remote(0.5)
    t0 = time.time()
    watch_engines([ref], done=lambda: time.time() - t0 > 0.2)  # the kernel finished first
    watch_engines([ref])  # then every receiver returned
    assert ray.get(ref) == 3 and time.time() - t0 < 5
    watch_engines([], done=lambda: True)
    ray.kill(a)


def test_engine_broken_names():
    import torch

    assert engine_broken(torch.OutOfMemoryError("CUDA out of memory"))
    assert engine_broken(type("EngineDeadError", (RuntimeError,), {})())
    assert not engine_broken(ValueError("prompt too long")) and not engine_broken(None)
