"""Failure behaviour through the real components: kill -9 and resume, crashes during checkpoint writes, a
dead learner rank, budgets for NaN and failing samples, a loopback-only Ray head."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from rl.config import load_config
from rl.learner import Learner, LearnerConfig, LearnerFailure, LearnerGroup
from rl.train import Batch, RunError, check_budgets
from rollout.sample import Sample, Status
from rollout.weights import recover_dir

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--config-name", "quickstart", "distill.enabled=false", "data.prompts_per_step=4", "rollout.n=4",
       "rollout.max_tokens=12", "eval.max_prompts=4", "eval.k=2", "trainer.micro_batch_size=16",
       "trainer.eval_every=0", "trainer.save_every=1", "logging.wandb=false", "logging.plots=false"]


def _cmd(run_dir, steps):
    return [sys.executable, "-m", "rl.train", *RUN, f"trainer.run_dir={run_dir}", f"trainer.steps={steps}"]


def _rows(run_dir, name="metrics.jsonl"):
    return [json.loads(l) for l in (Path(run_dir) / name).read_text().splitlines()]


def _train_metrics(run_dir):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("train/", "reward/", "adv/"))}
            for r in _rows(run_dir) if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [1, 2])
def test_kill_9_and_resume_equals_uninterrupted(tmp_path, kill_after_step):
    steps = 4
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref, steps), cwd=ROOT, check=True, capture_output=True, timeout=600)

    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:  # kill -9 as soon as the step is logged: mid-step k+1 or mid-checkpoint
        if metrics.exists() and any(json.loads(l).get("step") == kill_after_step and "train/loss" in l
                                    for l in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_cmd(run, steps), cwd=ROOT, check=True, capture_output=True, timeout=600)

    got, want = _train_metrics(run), _train_metrics(ref)
    trained = [r["step"] for r in _rows(run) if "train/loss" in r]
    assert trained == list(range(1, steps + 1)), f"steps logged twice or missing: {trained}"
    assert [r["step"] for r in _rows(run, "consumed.jsonl")] == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == want[step], f"step {step} differs after resume"
    consumed = lambda d: Counter(p for r in _rows(d, "consumed.jsonl") for p in r["prompts"])  # noqa: E731
    assert consumed(run) == consumed(ref), "prompts replayed or skipped"


def test_resumed_tracker_drops_rows_after_the_checkpoint(tmp_path):
    """A run killed after logging step 3 but before checkpointing it: on resume from step 2, the rows of
    step 3 go (that step runs again), so metrics and consumed prompts are logged once per step."""
    from rl.tracking import Tracker

    cfg = load_config(["logging.wandb=false"])
    for name in ("metrics.jsonl", "consumed.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (0, 1, 2, 3)))
    t = Tracker(str(tmp_path), cfg, resume_step=2)
    assert [h["step"] for h in t.history] == [0, 1, 2]
    assert [r["step"] for r in _rows(tmp_path, "consumed.jsonl")] == [0, 1, 2]
    Tracker(str(tmp_path), cfg, resume_step=None)  # a fresh run starts empty
    assert _rows(tmp_path) == [] and _rows(tmp_path, "consumed.jsonl") == []


def test_crash_during_checkpoint_write_keeps_previous(tiny_dense, tmp_path, monkeypatch):
    learner = Learner(LearnerConfig(model=tiny_dense))
    ckpt = tmp_path / "latest"
    learner.save_checkpoint(str(ckpt), {"step": 1})
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save({"half": True}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        learner.save_checkpoint(str(ckpt), {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert any(p.name.startswith(".latest.tmp") for p in tmp_path.iterdir())  # the half-written attempt
    assert learner.load_checkpoint(str(ckpt)) == {"step": 1}  # previous checkpoint loads; the tmp is removed
    assert not any(p.name.startswith(".latest.tmp") for p in tmp_path.iterdir())

    # A crash between the two renames of replace_dir: only ".latest.old" is left; it is detected and restored.
    new = tmp_path / ".latest.tmp-x"
    new.mkdir()
    ckpt.rename(tmp_path / ".latest.old")
    assert recover_dir(ckpt) == "restored %s from .latest.old; removed half-written .latest.tmp-x" % ckpt
    assert learner.load_checkpoint(str(ckpt)) == {"step": 1}
    with pytest.raises(FileNotFoundError, match="incomplete or missing"):
        learner.load_checkpoint(str(tmp_path / "nothing"))
    learner.shutdown()


@pytest.mark.slow
def test_dead_learner_rank_fails_fast_naming_it(ray_cluster, tiny_dense):
    group = LearnerGroup(LearnerConfig(model=tiny_dense, collective_timeout_s=30), world_size=2)
    s = Sample(prompt_ids=[5, 6], response_ids=[7, 8], logprobs=[-1.0, -1.0], loss_mask=[1, 1], status=Status.COMPLETED)
    killer = threading.Timer(0.5, lambda: ray_cluster.kill(group.actors[1]))
    killer.start()
    t0 = time.time()
    try:
        with pytest.raises(LearnerFailure, match=r"learner rank 1 died"):
            for _ in range(200):  # keep rank 0 busy in collectives until rank 1 is gone
                group.train_step([s, s, s, s])
        assert time.time() - t0 < 60
    finally:
        group.kill()  # the ranks and their placement group (left behind, it held 2 of the session's 4 CPUs)


def _batch(rewards):
    samples = [Sample(prompt_ids=[1], response_ids=[2], status=Status.COMPLETED, reward=r) for r in rewards]
    return Batch(samples, {}, {}, [])


def test_budgets_stop_the_run_with_the_count():
    cfg = load_config(["trainer.max_nonfinite_steps=2", "trainer.max_failure_rate=0.5"])
    n = 0
    for _ in range(2):
        n = check_budgets(_batch([1.0, 0.0]), {"train/loss": float("nan")}, cfg, n)
    with pytest.raises(RunError, match=r"3 steps had a non-finite loss or gradient \(> trainer.max_nonfinite_steps\)"):
        check_budgets(_batch([1.0, 0.0]), {"train/loss": 0.1, "train/skipped": 1.0}, cfg, n)
    assert check_budgets(_batch([1.0, None]), {"train/loss": 0.1}, cfg, 0) == 0  # 50% failed: at the limit
    with pytest.raises(RunError, match=r"2 of 3 samples failed or abstained this step"):
        check_budgets(_batch([1.0, None, None]), {"train/loss": 0.1}, cfg, 0)


def test_ray_head_exposure():
    """What we can guarantee with Ray 2.60: its gRPC servers listen on every interface whatever address it
    is given (`_node_ip_address` / `--node-ip-address` only change the advertised address), so the driver's
    head relies on Ray's token authentication (on by default) and starts no dashboard. Both are checked."""
    code = ("from rl.cluster import ray_session; from rl.config import ClusterConfig; import subprocess, os\n"
            "with ray_session(ClusterConfig()) as ray:\n"
            "    print(subprocess.run(['ss', '-ltn'], capture_output=True, text=True).stdout)\n"
            "    print('auth mode', os.environ.get('RAY_AUTH_MODE'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # Ray's own default
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "auth mode token"
    assert ":8265 " not in out.stdout  # no dashboard
