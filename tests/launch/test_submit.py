"""launch/: a bad config fails before submission; arguments, runtime env and secrets reach a job submitted
through the Jobs API of a local `ray start --head`; a run attaches to a local head."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
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


def test_a_driver_attaches_in_token_mode_only_with_a_token(tmp_path):
    """`ray start --head` on a machine without a token has no authentication (Ray 2.60): a driver forcing token
    mode could not attach to it. With a token (file or RAY_AUTH_TOKEN) the driver is in token mode;
    RAY_AUTH_MODE, when set, decides."""
    code = ("import os; from rl.cluster import enable_token_auth_if_available as e; "
            "print(e(), os.environ.get('RAY_AUTH_MODE'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}

    def mode(**extra) -> str:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra}, capture_output=True,
                              text=True, timeout=120, check=True).stdout.strip()

    assert mode() == "False None"
    assert mode(RAY_AUTH_TOKEN="t" * 32) == "True token"
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    assert mode() == "True token"
    assert mode(RAY_AUTH_MODE="disabled") == "False disabled"


@pytest.mark.slow
def test_run_on_a_local_ray_head(tmp_path, monkeypatch):
    """On a machine that never ran Ray (no ~/.ray/auth_token: Ray 2.60's `ray start` then starts without
    authentication, and a driver that forced token mode failed before connecting)."""
    import tempfile

    from launch.submit import start_head

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in [v for v in os.environ if v.startswith("RAY_AUTH")]:
        monkeypatch.delenv(var)
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    address = start_head(num_cpus=2, port=_port(), temp_dir=temp_dir)
    try:
        token = tmp_path / "home" / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_mode & 0o077 == 0  # the head runs with a token, ours alone
        run_dir = tmp_path / "run"
        args = ["--config-name", "quickstart", "distill.enabled=false", "trainer.steps=1", "data.prompts_per_step=2",
                "rollout.n=2", "rollout.max_tokens=8", "eval.max_prompts=2", "eval.k=2", "logging.wandb=false",
                f"trainer.run_dir={run_dir}", f"cluster.address={address}"]
        res = subprocess.run([sys.executable, "-m", "launch.submit", "--local", "--", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (run_dir / "submitted_config.yaml").read_text().count(address) == 1
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any(r["step"] == 1 and "train/loss" in r for r in rows)
    finally:
        _stop_head(temp_dir)


# Hydra-quoted (the quotes are part of the argument) and full of shell syntax; and a path with a space.
PROMPT = "data.system_prompt='Be brief; echo $HOME && ls * > /tmp/x'"
REMOTE = "model.path=/cluster only/ckpt"


def test_entrypoint_quotes_every_argument():
    from launch.submit import entrypoint

    args = ["--config-name", "quickstart", PROMPT, REMOTE, "data.train=a b.jsonl"]
    assert shlex.split(entrypoint("python", args)) == ["python", "-m", "rl.train", *args]


def test_runtime_env_merge_and_forwarded_names():
    from launch.submit import EXCLUDES, ROOT, job_runtime_env

    environ = {"WANDB_API_KEY": "k-shell", "HF_TOKEN": "h-shell", "OTHER": "o"}
    user = {"pip": ["x"], "env_vars": {"A": "from-file", "B": "from-file"}}
    env, names = job_runtime_env(user, ["B=from-flag", "HF_TOKEN"], environ)
    assert env == {"working_dir": str(ROOT), "excludes": EXCLUDES, "pip": ["x"],
                   "env_vars": {"WANDB_API_KEY": "k-shell", "A": "from-file", "B": "from-flag", "HF_TOKEN": "h-shell"}}
    assert names == ["HF_TOKEN", "WANDB_API_KEY"] and user["env_vars"] == {"A": "from-file", "B": "from-file"}
    # The runtime env's own value wins over the shell's; the flag wins over both.
    env, names = job_runtime_env({"env_vars": {"WANDB_API_KEY": "k-file"}, "working_dir": "/src"}, [], environ)
    assert env["env_vars"] == {"WANDB_API_KEY": "k-file"} and env["working_dir"] == "/src" and names == []
    assert job_runtime_env({}, ["WANDB_API_KEY=k-flag"], environ)[0]["env_vars"] == {"WANDB_API_KEY": "k-flag"}
    with pytest.raises(SystemExit, match="--env-var NOPE: not set in this environment"):
        job_runtime_env({}, ["NOPE"], environ)


def test_remote_paths_skip_only_the_local_existence_checks(tmp_path):
    from launch.submit import prepare
    from rl.config import ConfigError

    args = ["model.tiny=null", REMOTE, "agent.docs=/cluster/docs", f"trainer.run_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.path: '/cluster only/ckpt' is not a HF checkpoint directory"):
        prepare(args)
    train_args, saved = prepare(args, remote_paths=True)
    assert train_args == ["--config-name", "config", *args, "cluster.address=auto"]
    assert "path: /cluster only/ckpt" in saved.read_text() and "docs: /cluster/docs" in saved.read_text()
    with pytest.raises(ConfigError, match=r"algo.clip_eps: must be in \(0, 1\)"):  # the other checks still run
        prepare([*args, "algo.clip_eps=0"], remote_paths=True)


def test_config_dir_reaches_the_job_only_where_it_can_read_it(tmp_path):
    """--config-dir: inside the packaged working directory the job gets it relative to that directory; outside
    it, an error here (the job could not read it), unless --remote-paths says it exists on the cluster;
    with --local (the driver runs here) it stays this machine's path."""
    from launch.submit import prepare

    run = f"trainer.run_dir={tmp_path / 'run'}"
    args, _ = prepare(["--config-dir", str(ROOT / "configs"), "--config-name", "quickstart", run])
    assert args[:4] == ["--config-name", "quickstart", "--config-dir", "configs"]
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(SystemExit, match="--config-dir .*outside the working directory that is packaged for the job"):
        prepare(["--config-dir", str(mine), run])
    assert prepare(["--config-dir", str(mine), run], remote_paths=True)[0][:4] == ["--config-name", "config", "--config-dir", str(mine)]
    assert prepare(["--config-dir", str(mine), run], local=True)[0][2:4] == ["--config-dir", str(mine.resolve())]
    with pytest.raises(SystemExit, match="--cfg job: print the composed config here"):  # not dropped: refused
        prepare(["--cfg", "job", run])


@pytest.mark.slow
def test_submit_through_the_jobs_api(tmp_path, monkeypatch):
    """End to end against `ray start --head` with the Jobs API: the job runs rl.train on the "cluster",
    whose config check names the cluster-only path exactly as typed (quoting survived the shell); the
    W&B key reaches the job's runtime env without being printed or written by us."""
    import tempfile
    import uuid

    from launch.submit import _jobs_client, start_head

    venv_bin = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", f"{venv_bin}:{os.environ['PATH']}")  # as a user's activated venv
    for var in [v for v in os.environ if v.startswith("RAY_AUTH")]:
        monkeypatch.delenv(var)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    jobs_port = _port()
    start_head(num_cpus=1, port=_port(), temp_dir=temp_dir, jobs_port=jobs_port)
    try:
        secret = f"wandb-{uuid.uuid4().hex}"
        run_dir = tmp_path / "run"
        args = ["--config-name", "quickstart", "model.tiny=null", REMOTE, PROMPT, f"trainer.run_dir={run_dir}"]
        cmd = [sys.executable, "-m", "launch.submit", "--address", f"http://127.0.0.1:{jobs_port}", "--remote-paths",
               "--runtime-env-json", '{"env_vars": {"EXTRA": "1"}, "config": {"setup_timeout_seconds": 120}}',
               "--env-var", "HF_HOME=/cluster/hf", "--wait", "--", *args]
        for _ in range(60):  # the head's job agent comes up a few seconds after `ray start` returns
            res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_API_KEY": secret}, capture_output=True,
                                 text=True, timeout=120)
            if "No available agent to submit job" not in res.stderr:
                break
            time.sleep(1)
        out = res.stdout + res.stderr
        assert res.returncode == 1, out[-3000:]  # the job failed, on the cluster, at its own config check:
        assert "error: model.path: '/cluster only/ckpt' is not a HF checkpoint directory" in res.stdout, out[-3000:]
        assert "forwarded from this environment (values not shown): WANDB_API_KEY" in res.stdout
        job = re.search(r"submitted (\S+);", res.stdout).group(1)
        info = _jobs_client(f"http://127.0.0.1:{jobs_port}").get_job_info(job)
        assert shlex.split(info.entrypoint) == ["python", "-m", "rl.train", *args, "cluster.address=auto"]
        assert info.runtime_env["env_vars"] == {"WANDB_API_KEY": secret, "EXTRA": "1", "HF_HOME": "/cluster/hf"}
        assert info.runtime_env["config"]["setup_timeout_seconds"] == 120 and "working_dir" in info.runtime_env
        # Not printed, not in the run dir; on the cluster only where Ray's runtime-env agent logs env_vars.
        assert secret not in out
        assert not [f for f in run_dir.rglob("*") if f.is_file() and secret in f.read_text(errors="ignore")]
        holders = subprocess.run(["grep", "-rl", secret, temp_dir], capture_output=True, text=True).stdout.split()
        assert {Path(f).name for f in holders} <= {"runtime_env_agent.log"}
    finally:
        _stop_head(temp_dir)


def _stop_head(temp_dir: str) -> None:
    """Kill only this head's processes (`ray stop` would also stop the test session's own Ray)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in proc.info["cmdline"] or []):
            proc.kill()
