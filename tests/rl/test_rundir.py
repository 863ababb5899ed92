"""Never lose a run: checkpoints during training by default (numbered, the newest kept, `latest` swapped
atomically), a rerun never wipes an earlier run's files, one run per run dir (a lock), and a resume with
another config is refused with the keys named. The driver's `main` runs for real up to the loop; the loop
itself is replaced by a stub (the end-to-end runs are in test_train.py / test_reliability.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl import rundir, train
from rl.config import TrainerConfig, load_config, to_yaml
from rl.rundir import RunDirError

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config-name", "quickstart", "logging.wandb=false"]


class _LoopCalled(Exception):
    pass


@pytest.fixture
def loop_stub(monkeypatch):
    """Replace the training loop: record what it was called with and what the run dir held, then stop."""
    calls = []

    def stub(s, resume, demos):
        calls.append({"resume": resume, "files": sorted(p.name for p in s.dir.iterdir())})
        raise train.RunError("stub loop")

    monkeypatch.setattr(train, "_loop", stub)
    return calls


def _main(run_dir, *overrides):
    return train.main([*ARGS, f"trainer.run_dir={run_dir}", *overrides])


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    d = rundir.step_dir(run_dir, step)
    d.mkdir(parents=True)
    (d / "state.pt").write_text(f"step {step}")
    (d / "COMPLETE").write_text("ok\n")
    return d


def test_default_config_checkpoints_during_training():
    """A new user runs with the defaults and kills the run: there must be a checkpoint to resume from."""
    assert TrainerConfig().save_every > 0 and TrainerConfig().keep_checkpoints >= 1
    for name in ("config", "quickstart", "agent"):
        t = load_config([], name).trainer
        assert 0 < t.save_every < t.steps, (name, t.save_every, t.steps)
    assert train.due(10, 10, 20) and not train.due(10, 20, 20)  # the last step is the final save's


def test_numbered_checkpoints_latest_and_pruning(tmp_path):
    for step in (1, 2, 3, 4):
        rundir.point_latest(tmp_path, _fake_checkpoint(tmp_path, step), keep=2)
        latest = rundir.latest(tmp_path)
        assert latest.is_symlink() and os.readlink(latest) == f"step_{step:06d}"  # relative: the run dir can move
        assert (latest / "state.pt").read_text() == f"step {step}"
    assert sorted(p.name for p in rundir.checkpoints(tmp_path).iterdir()) == ["latest", "step_000003", "step_000004"]

    # A crash after step 5's rename but before `latest` was swapped: repair points it at step 5.
    _fake_checkpoint(tmp_path, 5)
    assert rundir.repair(tmp_path) == ["checkpoints/latest -> step_000005"]
    assert os.readlink(rundir.latest(tmp_path)) == "step_000005"
    # A crash while step 6 was written (the learner's temp dir) or between replace_dir's two renames.
    half = rundir.checkpoints(tmp_path) / ".step_000006.tmp"
    half.mkdir()
    rundir.step_dir(tmp_path, 4).rename(rundir.checkpoints(tmp_path) / ".step_000004.old")
    notes = rundir.repair(tmp_path)
    assert not half.exists() and (rundir.step_dir(tmp_path, 4) / "COMPLETE").is_file(), notes
    assert os.readlink(rundir.latest(tmp_path)) == "step_000005"

    # A run dir from before numbered checkpoints: `latest` is the checkpoint itself; the first save replaces it.
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints" / "latest").mkdir(parents=True)
    assert rundir.repair(legacy) == []
    rundir.point_latest(legacy, _fake_checkpoint(legacy, 7), keep=2)
    assert os.readlink(rundir.latest(legacy)) == "step_000007"


def test_learner_checkpoint_through_latest(tiny_dense, tmp_path):
    from rl.learner import Learner, LearnerConfig

    learner = Learner(LearnerConfig(model=tiny_dense))
    for step in (1, 2):
        learner.save_checkpoint(str(rundir.step_dir(tmp_path, step)), {"step": step})
        rundir.point_latest(tmp_path, rundir.step_dir(tmp_path, step), keep=1)
    assert learner.load_checkpoint(str(rundir.latest(tmp_path))) == {"step": 2}
    assert sorted(p.name for p in rundir.checkpoints(tmp_path).iterdir()) == ["latest", "step_000002"]
    learner.shutdown()


def test_rerun_without_checkpoint_keeps_the_earlier_files(tmp_path, loop_stub, capsys):
    """The reported bug: kill a run before its first checkpoint, rerun the same command: the rerun started
    over and its first rows replaced the earlier ones. Now the earlier files are moved aside first."""
    run = tmp_path / "run"
    run.mkdir()
    rows = "".join(json.dumps({"step": s, "reward/math/total": 0.1 * s}) + "\n" for s in (1, 2, 3))
    (run / "metrics.jsonl").write_text(rows)
    (run / "consumed.jsonl").write_text('{"step": 1, "prompts": []}\n')
    (run / ".wandb_id").write_text("abc123")
    assert _main(run) == 1  # the stub loop stops the run
    assert loop_stub[0]["resume"] is False
    assert "metrics.jsonl" not in loop_stub[0]["files"] and ".wandb_id" not in loop_stub[0]["files"]
    (kept,) = run.glob("previous-*")
    assert (kept / "metrics.jsonl").read_text() == rows and (kept / ".wandb_id").read_text() == "abc123"
    assert f"they are kept in {kept}/" in capsys.readouterr().err
    assert (run / "model_init" / "config.json").is_file()  # the tiny model is not an earlier run's result
    assert "trainer:" in (run / "config.yaml").read_text()


def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path, loop_stub, capsys):
    run = tmp_path / "run"
    cfg = load_config([*ARGS[2:], f"trainer.run_dir={run}"], "quickstart")
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    rundir.point_latest(run, _fake_checkpoint(run, 2), keep=2)

    assert _main(run, "trainer.lr=0.5", "algo.kl_coef=0.02") == 2
    err = capsys.readouterr().err
    assert "algo.kl_coef: 0.01 -> 0.02; trainer.lr: 0.001 -> 0.5" in err and f"trainer.run_dir={run}" in err
    assert "trainer.allow_config_change=true" in err and not loop_stub

    # Run length, logging and resources may change: a longer run resumes.
    assert _main(run, "trainer.steps=400", "logging.plots=false", "trainer.eval_every=50") == 1
    assert loop_stub[-1]["resume"] is True
    # The explicit key allows it; config.yaml then records the new config.
    assert _main(run, "trainer.lr=0.5", "trainer.allow_config_change=true") == 1
    assert "resuming with a changed config" in capsys.readouterr().err
    assert load_config([], "config", config_dir=str(run)).trainer.lr == 0.5  # = --config-dir RUN --config-name config


def _hold_lock(run_dir):
    code = f"from rl import rundir; import time; l = rundir.lock({str(run_dir)!r}); print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_run_dir_in_use_is_refused(tmp_path, loop_stub, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        t0 = time.monotonic()
        assert _main(run) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: trainer.run_dir={run} is in use by another run (pid {holder.pid})"), err
        assert time.monotonic() - t0 < 30 and not loop_stub  # refused before setup, nothing touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with rundir.lock(run):  # kill -9 of the holder frees the run dir
        pass
    assert _main(run) == 1 and loop_stub  # and now the run proceeds


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """The scoring pool forks children; one that outlives its driver must not keep the run dir locked."""
    held = rundir.lock(tmp_path)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the at-fork hooks have run when fork returns here
        os.write(ready_w, b"x")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        held.release()  # the driver is gone; its forked child still runs
        with rundir.lock(tmp_path):
            pass
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with rundir.lock(tmp_path), pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        rundir.lock(tmp_path)
