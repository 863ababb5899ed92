"""The run directory's rules, so that no run is lost or mixed with another.

- One run at a time: `lock` holds an flock on `<run_dir>/.lock` for the run's life (the kernel drops it when
  the process dies, even by kill -9); a second `rl.train` on the same run dir is refused, naming the holder.
- Nothing is wiped: a run dir that holds an earlier run's files (metrics.jsonl, ...) but no checkpoint to
  resume from has those files moved to `previous-<time>/` before the new run starts (`set_aside`).
- The config a run was started with is `config.yaml`; resuming with another config is refused with the
  differing keys, except the keys in `RESUMABLE` (run length, logging, resources) or with
  `trainer.allow_config_change=true` (`check_config`).
- Checkpoints are numbered (`checkpoints/step_N`, each written atomically by the learner: temp dir, COMPLETE
  marker, rename); `checkpoints/latest` is a relative symlink swapped atomically to the newest, and the newest
  `trainer.keep_checkpoints` are kept (`point_latest`). `repair` finishes what a crash interrupted.
- The checkpoint weight transport's directory (`weights_sync`, rl.components.weight_sync) lives in the run
  dir, so the run dir's lock makes it the run's own; it is removed when the run ends, however it ends, and
  a leftover of a killed run when the next run starts (`remove_weight_sync`).
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import time
from pathlib import Path

from rollout.weights import recover_dir

# Keys that may differ when a run resumes: how long it runs, how often it evaluates and saves, what it
# logs, where it runs, on how much hardware and how weights travel (every transport delivers the same
# weights). Everything else changes what is trained, so it is refused.
RESUMABLE = ("trainer.steps", "trainer.eval_every", "trainer.save_every", "trainer.keep_checkpoints",
             "trainer.allow_config_change", "trainer.run_dir", "trainer.learner_cpus", "trainer.learner_gpus",
             "trainer.learner_resources", "trainer.placement", "trainer.weight_sync", "trainer.sync_bucket_mb",
             "rollout.engine_cpus", "rollout.engine_gpus", "rollout.engine_resources", "rollout.gpu_memory_utilization",
             "rollout.enforce_eager", "data.num_proc", "logging.", "cluster.")
KEEP_IN_PLACE = ("model_init", ".lock")  # not an earlier run's results
_STEP = re.compile(r"^step_(\d+)$")


class RunDirError(RuntimeError):
    """The run dir cannot be used as asked (in use, or resumed with another config); exit code 2."""


class Lock:
    """An exclusive flock on `<run_dir>/.lock`, held until `release` (or the process's end). Forked children
    (the scoring pool's) close their copy at once: an flock lives while any copy of its descriptor is open,
    and a hung scorer outliving a killed driver would otherwise keep the run dir locked."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunDirError(f"trainer.run_dir={run_dir} is in use by another run (pid {holder}); wait for it "
                              "to finish or stop it, or pick another trainer.run_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(self)

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd is not None:
            os.close(self.fd)  # the last copy of the descriptor: the flock goes with it
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock(run_dir: str | Path) -> Lock:
    return Lock(Path(run_dir))


_HELD: set[Lock] = set()


def _close_in_child() -> None:
    for held in list(_HELD):
        os.close(held.fd)
        held.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def prepare(run_dir: Path, cfg, config_yaml: str) -> bool:
    """Before a run writes anything: finish interrupted checkpoint writes, decide whether it resumes, keep
    an earlier run's files aside when it does not, check and record the config. Returns `resume`."""
    for note in repair(run_dir):
        print(f"checkpoint recovery: {note}", file=sys.stderr)
    remove_weight_sync(run_dir)  # a killed run's: nothing reads it any more
    resume = (latest(run_dir) / "COMPLETE").is_file()
    if resume:
        check_config(run_dir, config_yaml, cfg.trainer.allow_config_change)
    else:
        moved = set_aside(run_dir)
        if moved:
            print(f"trainer.run_dir={run_dir} held an earlier run's files but no checkpoint to resume from: "
                  f"they are kept in {moved}/; starting over", file=sys.stderr)
    _write(run_dir / "config.yaml", config_yaml)
    return resume


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's files into `previous-<time>/` (None when there are none)."""
    logs = [run_dir / name for name in ("metrics.jsonl", "consumed.jsonl", "completions.jsonl")]
    if not any(p.is_file() and p.stat().st_size for p in logs) and not (run_dir / "final_model").exists():
        return None  # nothing of an earlier run (at most empty logs of one that died at once)
    dest = run_dir / time.strftime("previous-%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "-1")
    dest.mkdir()
    for p in sorted(run_dir.iterdir()):
        if p != dest and not p.name.startswith(KEEP_IN_PLACE) and not p.name.startswith("previous-"):
            p.rename(dest / p.name)
    return dest


def remove_weight_sync(run_dir: Path) -> None:
    """Remove the checkpoint transport's directory and its half-written or replaced siblings
    (`.weights_sync.tmp-<pid>`, `.weights_sync.old`: rollout.weights.replace_dir)."""
    for p in [run_dir / "weights_sync", *run_dir.glob(".weights_sync.*")]:
        shutil.rmtree(p, ignore_errors=True)


def check_config(run_dir: Path, config_yaml: str, allow: bool) -> None:
    """Refuse (RunDirError) to resume with a config other than `config.yaml`'s, naming the keys."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():  # a run dir from before config.yaml was written: nothing to compare
        return
    old = _flat(OmegaConf.to_container(OmegaConf.load(path)))
    new = _flat(OmegaConf.to_container(OmegaConf.create(config_yaml)))
    changed = [k for k in sorted(old.keys() | new.keys())
               if old.get(k, "<unset>") != new.get(k, "<unset>") and not k.startswith(RESUMABLE)]
    if not changed:
        return
    shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed)
    if not allow:
        raise RunDirError(f"trainer.run_dir={run_dir} holds a run started with another config; resuming it with "
                          f"these changes is refused: {shown}. Resume with the run's config (--config-dir {run_dir} "
                          "--config-name config), pass trainer.allow_config_change=true to resume anyway, or pick a "
                          "new trainer.run_dir")
    print(f"resuming with a changed config (trainer.allow_config_change=true): {shown}", file=sys.stderr)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def checkpoints(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> Path:
    return checkpoints(run_dir) / "latest"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints(run_dir) / f"step_{step:06d}"


def _complete(run_dir: Path) -> list[Path]:
    """The whole numbered checkpoints, oldest first."""
    root = checkpoints(run_dir)
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found) if (p / "COMPLETE").is_file()]


def point_latest(run_dir: Path, newest: Path, keep: int) -> None:
    """After `newest` was written: swap `latest` to it (a new symlink renamed over the old one, atomic),
    then delete the numbered checkpoints beyond the newest `keep`."""
    link, tmp = latest(run_dir), checkpoints(run_dir) / ".latest-link.tmp"
    if link.is_dir() and not link.is_symlink():  # a run dir from when `latest` was the checkpoint itself
        shutil.rmtree(link)
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(newest.name)
    tmp.rename(link)
    for old in _complete(run_dir)[:-keep]:
        if old != newest:
            shutil.rmtree(old)


def repair(run_dir: Path) -> list[str]:
    """After a crash: restore or remove half-renamed checkpoint dirs (`rollout.weights.recover_dir`), and
    point `latest` at the newest whole checkpoint (a crash can fall between a checkpoint's rename and the
    swap of `latest`). Returns what was found."""
    root, notes = checkpoints(run_dir), []
    if not root.is_dir():
        return notes
    names = {re.sub(r"^\.(.+?)\.(old|tmp.*)$", r"\1", p.name) for p in root.iterdir() if p.name.startswith(".")}
    for name in sorted(names - {"latest-link"}):
        note = recover_dir(root / name)
        if note:
            notes.append(note)
    (root / ".latest-link.tmp").unlink(missing_ok=True)
    whole = _complete(run_dir)
    link = latest(run_dir)
    if whole and (not link.is_symlink() or link.resolve() != whole[-1].resolve()):
        if link.is_symlink() or not link.exists():
            point_latest(run_dir, whole[-1], keep=len(whole))
            notes.append(f"checkpoints/latest -> {whole[-1].name}")
    return notes
