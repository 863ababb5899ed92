"""Stopping a run: SIGINT (Ctrl-C, sent to the whole process group) and SIGTERM stop at a step boundary with
a checkpoint and a one-line message, and the rerun equals an uninterrupted run; a second signal exits at
once; a driver killed by kill -9 leaves no process of its private Ray instance behind (rl.cluster's
watchdog); the checkpoint transport's directory is the run's own and does not outlive the run."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from rl import cluster, components, rundir, train
from rl.config import load_config, to_yaml
from tests.rl.test_reliability import ROOT, _cmd, _rows, _train_metrics

STEPS = 4
SYNC = ["trainer.weight_sync=checkpoint"]  # the transport with a directory in the run dir
# rl.train whose driver sends itself SIGTERM while step 2 trains: in async mode step 3's collection is then
# running (it started when step 1's weights were synced, and it is held 3 s so that it is still running),
# which an outside signal hits only by chance.
SIGTERM_WHILE_STEP_2_TRAINS = """
import os, signal, sys, time
from rl import train
real, real_generate = train.train, train.generate
def train_and_signal(learner, batch, step, cfg):
    if step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(learner, batch, step, cfg)
def slow_generate(s, engines, stream, step):
    if step == 2:
        time.sleep(3)
    return real_generate(s, engines, stream, step)
train.train, train.generate = train_and_signal, slow_generate
sys.exit(train.main(sys.argv[1:]))
"""

# ... and one that signals itself during the step-0 evaluation, before any collection was queued.
SIGTERM_BEFORE_STEP_1 = """
import os, signal, sys
from rl import train
real = train.evaluate
def evaluate_and_signal(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
train.evaluate = evaluate_and_signal
sys.exit(train.main(sys.argv[1:]))
"""


def _trained(run: Path, step: int) -> bool:
    """Is `step`'s training row in metrics.jsonl (whose last line may be half-written)?"""
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step") == step and "train/loss" in row:
            return True
    return False


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not _trained(run, step):
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {step}"
        assert time.time() < deadline, f"no step {step} in 300 s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref = tmp_path_factory.mktemp("signals") / "ref"
    subprocess.run(_cmd(ref, STEPS) + SYNC, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("sig, sender, mode", [(signal.SIGINT, os.killpg, "sync"), (signal.SIGTERM, os.kill, "sync"),
                                               (signal.SIGTERM, None, "async")], ids=["ctrl-c", "sigterm", "sigterm-async-in-flight"])
def test_signal_stops_at_a_step_boundary_and_the_rerun_equals_an_uninterrupted_run(tmp_path, uninterrupted, sig, sender, mode):
    """A terminal's Ctrl-C signals the whole foreground process group (os.killpg). Async: the collection
    running at the stop is waited for and dropped, and the checkpoint's data position is before its prompts.
    (A resumed async run's metrics differ from an uninterrupted one's: its first batch comes from the
    restored weights, not from one step staler ones; its prompts are the same.)"""
    run, cmd = tmp_path / "run", _cmd(tmp_path / "run", STEPS) + SYNC + [f"trainer.mode={mode}"]
    with open(tmp_path / "stderr", "w") as f:  # a file, not a pipe: nothing reads a pipe while the run goes on
        first = cmd if sender else [cmd[0], "-c", SIGTERM_WHILE_STEP_2_TRAINS, *cmd[3:]]
        proc = subprocess.Popen(first, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
    if sender:
        _wait_for_step(run, 1, proc)
        sender(proc.pid, sig)
    proc.wait(timeout=300)
    err = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    m = re.fullmatch(rf"stopped by {sig.name} after step (\d+): checkpoint at (\S+); rerun the same command to resume",
                     err.strip().splitlines()[-1])
    assert m, err[-3000:]
    step = int(m[1])
    assert 1 <= step < STEPS and Path(m[2]) == rundir.step_dir(run, step) and (sender or step == 2)
    assert rundir.latest(run).resolve() == rundir.step_dir(run, step) and (rundir.step_dir(run, step) / "COMPLETE").is_file()
    assert [r["step"] for r in _rows(run) if "train/loss" in r] == list(range(1, step + 1))  # ended at the boundary
    assert not (run / "final_model").exists()
    assert not list(run.glob("*weights_sync*")), "the weight-sync dir outlived the stopped run"

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    got, want = _train_metrics(run), _train_metrics(uninterrupted)
    assert [r["step"] for r in _rows(run) if "train/loss" in r] == list(range(1, STEPS + 1))
    if mode == "sync":
        assert all(got[k] == want[k] for k in range(1, STEPS + 1)), "a resumed step differs from the uninterrupted run's"
    consumed = lambda d: Counter(p for r in _rows(d, "consumed.jsonl") for p in r["prompts"])  # noqa: E731
    assert consumed(run) == consumed(uninterrupted), "prompts lost or replayed across the stop"
    assert not list(run.glob("*weights_sync*")) and not list(uninterrupted.glob("*weights_sync*"))


@pytest.mark.slow
def test_a_signal_before_the_first_step_stops_with_a_step_0_checkpoint(tmp_path, uninterrupted):
    """A signal during setup or the step-0 evaluation: nothing is queued, the run stops before step 1 with a
    checkpoint at step 0 (was: IndexError from an empty prefetch queue), and the rerun equals an uninterrupted run."""
    run, cmd = tmp_path / "run", _cmd(tmp_path / "run", STEPS) + SYNC
    res = subprocess.run([cmd[0], "-c", SIGTERM_BEFORE_STEP_1, *cmd[3:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM after step 0: checkpoint at {rundir.step_dir(run, 0)}; "
                                                   "rerun the same command to resume")
    assert (rundir.step_dir(run, 0) / "COMPLETE").is_file() and not any("train/loss" in r for r in _rows(run))
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert _train_metrics(run) == _train_metrics(uninterrupted)
    consumed = lambda d: Counter(p for r in _rows(d, "consumed.jsonl") for p in r["prompts"])  # noqa: E731
    assert consumed(run) == consumed(uninterrupted)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _tree(root: int) -> dict[int, int]:
    """The descendants of `root` now: pid -> start time."""
    table = {int(p): st for p in os.listdir("/proc") if p.isdigit() and (st := _stat(int(p)))}
    out, todo = {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (_, ppid, start) in table.items():
            if ppid == parent and pid not in out:
                out[pid] = start
                todo.append(pid)
    return out


def _uses(pid: int, root: str) -> bool:
    """Names a path under `root` on its command line or holds a file under it open."""
    try:
        if (root + "/").encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(root + "/") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _left(tree: dict[int, int], ray_tmp: str) -> set[int]:
    """Live processes (zombies are dead) of the driver's tree (same pid and start time) or of its Ray
    instance's temp dir."""
    live = {int(p): st for p in os.listdir("/proc") if p.isdigit() and (st := _stat(int(p))) and st[0] != "Z"}
    return {p for p, st in live.items() if tree.get(p) == st[2] or _uses(p, ray_tmp)} - {os.getpid()}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM twice"])
def test_a_killed_driver_leaves_no_process_behind(tmp_path, how):
    """Today's Ray leaves the raylet's dashboard and runtime-env agents up for about a minute after its
    driver is SIGKILLed. The run's Ray instance gets a temp dir of its own here, so its processes are told
    from any other session's by the files they hold; the driver's process tree is recorded before the kill."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths have a length limit
    run, tree = tmp_path / "run", {}
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(_cmd(run, 50), cwd=ROOT, env={**os.environ, "RAY_TMPDIR": ray_tmp}, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    try:
        _wait_for_step(run, 2, proc)  # step 1's checkpoint is written
        tree = _tree(proc.pid)
        assert any(_uses(p, ray_tmp) for p in tree), "the run's Ray processes are not where the test looks"
        t0 = time.time()
        if how == "kill -9":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.2)
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        exited = time.time() - t0
        while (left := _left(tree, ray_tmp)) and time.time() - t0 < 20:
            time.sleep(0.5)
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ")[:100] for p in left if _stat(p)}
        assert not left, f"still alive {time.time() - t0:.0f} s after the driver died: {names}"
        if how == "SIGTERM twice":
            assert proc.returncode == 128 + signal.SIGTERM and exited < 5, (proc.returncode, exited)
            assert "stopped by" not in (tmp_path / "stderr").read_text()
            assert (rundir.latest(run) / "COMPLETE").is_file()  # the resume point is whole
    finally:  # never leave this test's processes behind, even when it fails
        for pid in _left(tree, ray_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _no_pidfd(pid: int):
    raise OSError(errno.ENOSYS, "pidfd_open")


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_watchdog_kills_the_sessions_processes_and_no_other(tmp_path, monkeypatch, pidfd):
    """`rl.cluster.watch` on a stand-in session: a process holding a file under the session dir and one
    naming it on its command line are killed once the driver exits; one of a session whose name starts the
    same way is left alone. Without pidfd (Linux < 5.3) the watchdog polls the driver."""
    session, other = tmp_path / "session_1", tmp_path / "session_12"
    session.mkdir()
    other.mkdir()
    hold = "import sys, time; open(sys.argv[1], 'w'); time.sleep(120)"
    procs = [subprocess.Popen([sys.executable, "-c", hold, str(d / "log")]) for d in (session, other)]
    procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", f"--log-dir={session}"]))
    try:
        while not ((session / "log").exists() and (other / "log").exists()):
            time.sleep(0.05)
        driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
        procs.append(driver)
        if not pidfd:
            monkeypatch.setattr(os, "pidfd_open", _no_pidfd)
        assert cluster.watch(driver.pid, str(session)) == 2
        assert procs[0].wait(timeout=5) == -signal.SIGKILL and procs[2].wait(timeout=5) == -signal.SIGKILL
        assert procs[1].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_weight_sync_dir_is_the_runs_own_and_removed(tmp_path):
    """Two runs whose run dirs share a basename get two directories, each inside its run dir (which the run
    dir's lock gives to one run at a time); `remove_weight_sync` removes it with its temp and old siblings,
    and a killed run's leftover goes when the next run prepares the run dir."""
    cfg = load_config(SYNC)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    dirs = []
    for parent in ("a", "b"):
        run_dir = tmp_path / parent / "run"
        engines = SimpleNamespace(weight_sync=None, cfg=SimpleNamespace(model=str(model), dtype="float32"))
        with rundir.lock(run_dir):
            sync = Path(components.weight_sync(cfg, object(), engines, run_dir).checkpoint_dir)
            assert sync.parent == run_dir
            dirs.append(sync)
            for name in (sync.name, f".{sync.name}.tmp-123", f".{sync.name}.old"):  # rollout.weights.export_hf_checkpoint's
                (run_dir / name).mkdir()
            rundir.remove_weight_sync(run_dir)
            assert [p.name for p in run_dir.iterdir()] == [".lock"]
            sync.mkdir()
            rundir.prepare(run_dir, cfg, to_yaml(cfg))
            assert not sync.exists()
    assert dirs[0] != dirs[1]


def test_a_run_that_fails_removes_its_weight_sync_dir_and_restores_signal_handlers(tmp_path, monkeypatch):
    def loop(s, resume, demos):
        (s.dir / "weights_sync").mkdir()
        assert signal.getsignal(signal.SIGTERM) == train.STOP._handle  # installed for the run
        raise train.RunError("stub loop")

    monkeypatch.setattr(train, "_loop", loop)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert train.main(["--config-name", "quickstart", "logging.wandb=false", f"trainer.run_dir={tmp_path}"]) == 1
    assert not (tmp_path / "weights_sync").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stop_records_the_signal_and_no_next_collection_starts(mode):
    stop = train.Stop()
    prefetch = train.Prefetcher(lambda k: k, mode, steps=10, stop=stop)
    with stop:
        prefetch.start(0)
        assert prefetch.take(0) == 0 and not stop.check(1)
        prefetch.weights_synced(0)
        queued = prefetch.queued  # sync: step 1's collection; async: steps 1 and 2 (up to step 1 + staleness)
        assert queued == (2 if mode == "sync" else 3)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs in this (main) thread before kill returns
        assert stop.signum == signal.SIGTERM and stop.step is None
        assert prefetch.take(1) == 1
        prefetch.weights_synced(1)
        assert prefetch.queued == queued, "a collection started after the stop signal"
        assert stop.check(2) and stop.step == 2
    prefetch.close()
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # the handlers before `with` are back
