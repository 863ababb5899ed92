"""launch/: a bad config fails before submission; a run attaches to a local `ray start --head` cluster."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_config_is_refused_before_submission(tmp_path):
    res = subprocess.run([sys.executable, "-m", "launch.submit", "--address", "http://127.0.0.1:9", "--",
                          "algo.kl_coef=-1", f"trainer.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "algo.kl_coef: must be >= 0" in res.stderr


@pytest.mark.slow
def test_run_on_a_local_ray_head(tmp_path):
    from launch.submit import start_head

    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    address = start_head(num_cpus=2, port=_port(), temp_dir=temp_dir)
    try:
        run_dir = tmp_path / "run"
        args = ["--config-name", "quickstart", "distill.enabled=false", "trainer.steps=1", "data.prompts_per_step=2",
                "rollout.n=2", "rollout.max_tokens=8", "eval.max_prompts=2", "eval.k=2", "logging.wandb=false",
                f"trainer.run_dir={run_dir}", f"cluster.address={address}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # as a user's shell
        res = subprocess.run([sys.executable, "-m", "launch.submit", "--local", "--", *args], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (run_dir / "submitted_config.yaml").read_text().count(address) == 1
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any(r["step"] == 1 and "train/loss" in r for r in rows)
    finally:
        _stop_head(temp_dir)


def _stop_head(temp_dir: str) -> None:
    """Kill only this head's processes (`ray stop` would also stop the test session's own Ray)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            proc.kill()
