"""The agentic example end to end: SFT on reference solutions played through the tools, GRPO on tool-use
episodes with context management, then task synthesis with the trained policy feeding the driver."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl import pipeline
from rollout.sample import Sample, Status

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.prompts_per_step=4", "rollout.n=4", "eval.max_prompts=8", "eval.k=2", "trainer.eval_every=0",
         "logging.wandb=false"]


def _train(run_dir, *overrides):
    cmd = [sys.executable, "-m", "rl.train", "--config-name", "agent", f"trainer.run_dir={run_dir}", *SMALL, *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_segments_train_with_their_episode_advantage():
    seg = Sample(prompt_ids=[1], response_ids=[2, 3], logprobs=[0.0] * 2, loss_mask=[1, 1], status=Status.TRUNCATED)
    last = Sample(prompt_ids=[1], response_ids=[4], logprobs=[0.0], loss_mask=[1], status=Status.COMPLETED,
                  segments=[seg], reward=1.0, advantage=0.5)
    dropped = Sample(prompt_ids=[1], response_ids=[5], status=Status.COMPLETED, segments=[seg], reward=None)
    assert pipeline.trainable([last, dropped]) == [seg, last]
    assert (seg.reward, seg.advantage) == (1.0, 0.5)


@pytest.mark.slow
def test_agent_example_trains_with_tools_and_synthesises_tasks(tmp_path):
    # max_context 300: the first tool turn already crosses 80% of it, so discard_75 fires in real episodes.
    rows = _train(tmp_path / "run", "trainer.steps=2", "agent.max_context=300")
    distill = next(r for r in rows if "distill/examples" in r)
    assert distill["distill/agent/kept_frac"] == 1.0 and distill["distill/nll_last"] < 0.5
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # the reward is logged per step, per dimension; the tools ran
        assert {"reward/agent/total", "reward/agent/correct", "reward/agent/format", "reward/agent/language"} <= set(r)
        assert r["agent/tool_calls"] > 0.5 and r["agent/turns"] >= 1
        assert r["train/mismatch_kl"] < 1e-5 and r["train/routing_agreement"] == pytest.approx(1.0)
    assert sum(r.get("agent/context/discard_75", 0) for r in steps) > 0
    assert "eval/agent/tool_calls" in rows[-1]

    # Synthesis with the trained policy; its output (and the unfiltered seed) is data the driver trains on.
    policy, out, seed = tmp_path / "run/final_model", tmp_path / "synth.jsonl", tmp_path / "seed.jsonl"
    base = [sys.executable, "-m", "rl.synthesize", "--env", "examples/agent/env", "--seed", "5"]
    res = subprocess.run(base + ["--policy", str(policy), "--num-tasks", "8", "--k", "4", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = dict(kv.split("=") for kv in res.stdout.splitlines()[0].split())
    assert int(counts["generated"]) == 8 == sum(int(v) for k, v in counts.items() if k != "generated")
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(kept) == int(counts.get("kept", 0)) and all(0 < r["pass_rate"] < 1 for r in kept)
    subprocess.run(base + ["--no-filter", "--num-tasks", "4", "--out", str(seed)], cwd=ROOT, check=True, capture_output=True)
    data = tmp_path / "train.jsonl"
    data.write_text(out.read_text() + seed.read_text())
    rows = _train(tmp_path / "run2", "trainer.steps=1", f"data.train={data}", "data.eval=null", f"model.path={policy}",
                  "model.tiny=null", "distill.enabled=false")
    assert [r["step"] for r in rows if "train/loss" in r] == [1]
