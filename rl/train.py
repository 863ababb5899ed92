"""The driver: `python -m rl.train [--config-dir DIR] [--config-name NAME] [--cfg job] [key=value ...]`.

    generate -> score -> advantages -> train -> sync weights -> log -> checkpoint

`setup` turns the config into plain components (no Ray yet: every config and data error surfaces first);
`rl.components` builds the engines and the learner; `Prefetcher` owns the one scheduling decision (sync:
collect step k+1 after step k's weights reached the engines; async: while step k is scored and trains,
staleness 1, bounded by `trainer.max_staleness`: older samples are dropped and counted; generation and
scoring are separate threads, so the engines never wait for scoring); `_loop` is the loop. The run
dir's rules (one run at a time, nothing wiped, config.yaml, numbered checkpoints) are `rl.rundir`'s.
SIGINT/SIGTERM stop the run at the next step boundary with a checkpoint (`Stop`).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rl import components, pipeline, rundir
from rl.cluster import ray_session
from rl.components import Setup, setup
from rl.config import AUTO_NOTES, Config, ConfigError, cli_parser, load_config, to_yaml
from rl.data import DataError, PromptStream
from rl.eval import evaluate_setup as evaluate
from rl.learner import LearnerFailure
from rl.rundir import RunDirError
from rollout import progress
from rollout.manager import EngineLost, StaleWeightsError


class RunError(RuntimeError):
    """The run stopped on purpose (failure budget, NaN budget); the message says why."""


@dataclass
class Batch:
    samples: list
    metrics: dict
    position: dict  # data position after this batch's prompts (saved when the batch is trained)
    sources: list  # file:row of each prompt


def generate(s: Setup, engines, stream: PromptStream, step: int) -> tuple:
    """Prompts -> n samples each (the engines' stage; the prefetcher's generation thread). The data position
    is taken here: the next generation may advance the stream before this batch is scored."""
    t0, cfg = time.time(), s.cfg
    prompts = stream.next(cfg.data.prompts_per_step)
    position = stream.position
    sampling = components.sampling(cfg.rollout, seed=cfg.trainer.seed * 100_003 + step)
    groups, gen = pipeline.generate(engines, prompts, sampling, s.agent)
    return prompts, position, groups, {**gen, "time/generate": time.time() - t0}


def score(s: Setup, generated: tuple) -> Batch:
    """Rewards and advantages of one generation (the prefetcher's scoring thread, beside the next generation)."""
    prompts, position, groups, metrics = generated
    t0, samples = time.time(), pipeline.flat(groups)
    rew = pipeline.score(samples, s.specs, s.pool, s.tok)
    adv = pipeline.assign_advantages(groups, s.cfg.algo.advantage)
    return Batch(samples, {**metrics, **rew, **adv, "time/score": time.time() - t0}, position, [p.source for p in prompts])


class Stop:
    """SIGINT and SIGTERM stop the run at the next step boundary: the handler only records the signal,
    `_loop` reads it once a step (`check`), writes a checkpoint and leaves; the exit code is 128 + the
    signal's number (130, 143), as if the signal had killed it, so a scheduler does not take the run for
    finished. A second signal while stopping exits at once with that code: the last whole checkpoint is the
    resume point and rl.cluster's watchdog ends the private Ray instance."""

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.step: int | None = None  # the step the run stopped after (checkpointed)
        self._previous: dict = {}

    def __enter__(self) -> Stop:
        self.signum = self.step = None
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        # os.write: print() from a handler can hit the main thread inside a print (reentrant call error)
        os.write(2, f"{signal.Signals(signum).name}: stopping after this step with a checkpoint; send it again "
                    "to exit at once\n".encode())

    def check(self, step: int) -> bool:
        """Called after `step`: stop here? (read once a step, so the checkpoint and the exit agree)"""
        if self.signum is not None:
            self.step = step
        return self.step is not None


STOP = Stop()


class Prefetcher:
    """The scheduling of collection, in one place. A collection is two stages, each with its own thread:
    `generate_fn(k)` (the engines) then `finish_fn` on its result (scoring, on the CPU), so the engines start
    the next generation while this one is scored. Sync: step k+1's samples are generated after step k's
    weights reached the engines (on-policy). Async with staleness bound d (`trainer.max_staleness`): once
    version k is on the engines (the weights of step k - 1 synced), the collections of steps up to k + d are
    queued, so generation never waits for training or scoring, and a batch is at most d policy versions old
    (its generation starts after version k's sync). Once `stop` has a signal no next
    collection starts (the loop then stops after this step); one already running is waited for by `close`,
    queued ones are cancelled, and their samples dropped (the checkpoint's data position is before their
    prompts, so the resumed run collects them: no prompt is lost or replayed)."""

    def __init__(self, generate_fn, mode: str, steps: int, stop: Stop, depth: int = 1, finish_fn=None):
        self.generate_fn, self.mode, self.steps, self.stop, self.depth = generate_fn, mode, steps, stop, depth
        self.finish_fn = finish_fn or (lambda x: x)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.finish_pool = ThreadPoolExecutor(1, thread_name_prefix="score")
        self.pending: deque = deque()  # futures of the next steps' batches, in step order
        self.queued = 0  # the next step to queue

    def start(self, step: int) -> None:
        self.queued = step
        self._queue_until(step)

    def take(self, step: int) -> Batch | None:
        """Step `step`'s batch; None when a stop signal came before it was queued (only possible for the
        first step: later ones are queued, or not, before the loop checks the signal)."""
        if self.mode == "async":
            self._queue_until(step + self.depth)  # before waiting: generates while this batch is scored and trained
        if not self.pending:
            return None
        return self.pending.popleft().result()

    def weights_synced(self, step: int) -> None:
        """Step `step`'s weights (version step + 1) reached the engines: queue what that version allows (sync:
        step k+1's collection; async: up to step k+1+d, what `take(step + 1)` would queue), so the engines
        generate while the loop logs and checkpoints."""
        self._queue_until(step + 1 + (self.depth if self.mode == "async" else 0))

    def _queue_until(self, last: int) -> None:
        while self.queued <= min(last, self.steps - 1) and self.stop.signum is None:
            generated = self.pool.submit(self.generate_fn, self.queued)
            self.pending.append(self.finish_pool.submit(lambda g=generated: self.finish_fn(g.result())))
            self.queued += 1

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.finish_pool.shutdown(wait=True, cancel_futures=True)


def sync_weights(s: Setup, learner, engines, version: int) -> dict[str, float]:
    """Learner weights -> every engine through `trainer.weight_sync` (rl.components.weight_sync: tensors over
    NCCL, CUDA IPC or Ray's object store, or a checkpoint in the run dir); versions are checked (StaleWeightsError).
    Returns `time/sync` and its parts (`time/sync_<part>`, `WeightSync.sync`): `send` includes waiting for an
    engine that is still generating (an engine actor runs one call at a time); `call` is the rest of the learner
    call (Ray's dispatch, the state dict)."""
    t0 = time.time()
    parts = components.weight_sync(s.cfg, learner, engines, s.dir).sync(version)
    return {"time/sync": time.time() - t0, **{f"time/sync_{k}": v for k, v in parts.items()}}


def train(learner, batch: Batch, step: int, cfg: Config) -> dict:
    """One optimiser step on the batch's trainable samples no staler than `trainer.max_staleness`."""
    trainable = pipeline.trainable(batch.samples)
    fresh = [x for x in trainable if step - x.policy_version <= cfg.trainer.max_staleness]
    t0 = time.time()
    metrics = learner.train_step(fresh) if fresh else {"loss": 0.0}
    return {**{f"train/{k}": v for k, v in metrics.items()}, "time/train": time.time() - t0,
            "rollout/stale_dropped": len(trainable) - len(fresh),
            "rollout/staleness_max": max((step - x.policy_version for x in fresh), default=0)}


def due(every: int, step: int, last: int) -> bool:
    """A periodic action (eval, save) after `step` (1-based); the last step has its own."""
    return bool(every) and step % every == 0 and step < last


def check_budgets(batch: Batch, metrics: dict, cfg: Config, nonfinite: int) -> int:
    """Count NaN/inf steps and stop when a budget is exceeded (RunError names the count)."""
    bad = [s for s in batch.samples if s.reward is None]
    if batch.samples and len(bad) / len(batch.samples) > cfg.trainer.max_failure_rate:
        raise RunError(f"{len(bad)} of {len(batch.samples)} samples failed or abstained this step "
                       f"(> trainer.max_failure_rate={cfg.trainer.max_failure_rate})")
    if not math.isfinite(metrics.get("train/loss", 0.0)) or metrics.get("train/skipped", 0.0):
        nonfinite += 1
        if nonfinite > cfg.trainer.max_nonfinite_steps:
            raise RunError(f"{nonfinite} steps had a non-finite loss or gradient (> trainer.max_nonfinite_steps)")
    return nonfinite


def save(s: Setup, learner, step: int, position: dict | None, wait: bool = True) -> None:
    """Checkpoint `step` as checkpoints/step_N (atomic: the learner writes a temp dir, seals it with a
    COMPLETE marker and renames it), point checkpoints/latest at it, keep the newest `trainer.keep_checkpoints`.
    `wait=False` (periodic saves with `trainer.async_checkpoint`): the write goes on while training continues,
    and `latest` moves when it is sealed, at the next save or `finish_saves`."""
    _point_latest(s, learner.save_checkpoint(str(rundir.step_dir(s.dir, step)), {"step": step, "data_position": position},
                                             wait=wait or not s.cfg.trainer.async_checkpoint))


def finish_saves(s: Setup, learner) -> None:
    _point_latest(s, learner.finish_checkpoint())


def _point_latest(s: Setup, sealed: list[str]) -> None:
    """`latest` follows each checkpoint the learner sealed, oldest first."""
    for path in sealed:
        rundir.point_latest(s.dir, Path(path), s.cfg.trainer.keep_checkpoints)


def stop_before(s: Setup, learner, step: int, stream: PromptStream) -> bool:
    """A stop before `step` trained: its checkpoint (unless distillation or the resumed run left one), so
    that the rerun resumes there like after any other stop. No collection ran: the stream's position is exact."""
    if STOP.signum is None:
        raise RuntimeError(f"no batch was queued for step {step + 1} and no stop signal came: a scheduling bug")
    if not (rundir.step_dir(s.dir, step) / "COMPLETE").is_file():
        save(s, learner, step, stream.position)
    return STOP.check(step)


def start(s: Setup, learner, engines, resume: bool, demos: dict):
    """Restore (or distil), bring the engines to the learner's weights, and open the tracker and the stream.
    `demos`: the `data:` specialists' samples (`rl.distill.demonstrations`)."""
    from rl.distill import distill
    from rl.tracking import Tracker

    state = learner.load_checkpoint(str(s.ckpt)) if resume else {"step": 0, "data_position": None}
    tracker = Tracker(str(s.dir), s.cfg, resume_step=state["step"] if resume else None)
    stream = PromptStream(s.train_prompts, s.cfg.data.shuffle_seed)
    if state["data_position"]:
        stream.restore(state["data_position"])
    if s.cfg.distill.enabled and not resume:
        tracker.log(0, {"_kind": "distill", **distill(s.cfg, s.tok, s.specs, s.pool, s.agent, s.train_prompts, learner, demos)})
        if s.cfg.trainer.steps:  # a crash during RL resumes after the SFT (steps=0: the final save follows at once)
            save(s, learner, 0, None)
    if resume or s.cfg.distill.enabled:
        sync_weights(s, learner, engines, state["step"])
    if not resume and s.cfg.trainer.steps:  # with steps=0 (an SFT job) the final evaluation is the only one
        tracker.log(0, {"_kind": "eval", **evaluate(s, engines)})
    return state["step"], tracker, stream


def _loop(s: Setup, resume: bool, demos: dict):
    cfg, steps = s.cfg, s.cfg.trainer.steps
    with ray_session(cfg.cluster):
        learner, engines = components.actors(cfg, s.model_path, s.kl_coefs)
        first, tracker, stream = start(s, learner, engines, resume, demos)
        prefetch = Prefetcher(lambda k: generate(s, engines, stream, k), cfg.trainer.mode, steps, STOP,
                              cfg.trainer.max_staleness, finish_fn=lambda g: score(s, g))
        prefetch.start(first)
        nonfinite, t_last, stopping = 0, time.time(), False
        for step in range(first, steps):
            batch = prefetch.take(step)
            if batch is None:  # a signal during setup, distillation or the first evaluation
                stopping = stop_before(s, learner, step, stream)
                break
            row = {**batch.metrics, **train(learner, batch, step, cfg)}
            row.update(sync_weights(s, learner, engines, version=step + 1))
            nonfinite = check_budgets(batch, row, cfg, nonfinite)
            row["time/step"], t_last = time.time() - t_last, time.time()  # wall between rows (async overlap shows)
            if due(cfg.trainer.eval_every, step + 1, steps):  # sync mode: before the next collection, not behind it
                row.update(evaluate(s, engines))
            prefetch.weights_synced(step)
            tracker.log(step + 1, row)
            tracker.log_consumed(step + 1, batch.sources)
            _progress(cfg, step + 1, row)
            stopping = STOP.check(step + 1)
            if due(cfg.trainer.save_every, step + 1, steps) or stopping:  # not stream.position: a collection may be in flight
                save(s, learner, step + 1, batch.position, wait=stopping)
            if stopping:
                break
        prefetch.close()
        finish_saves(s, learner)
        if not stopping:  # a stopped run ends at its checkpoint; the rerun does the rest
            tracker.log(steps, {"_kind": "eval", **evaluate(s, engines)})
            save(s, learner, steps, stream.position)  # nothing in flight
            learner.export_hf(str(s.dir / "final_model"))
        learner.shutdown()
    return tracker


def main(argv: list[str] | None = None) -> int:
    a = cli_parser("GRPO with DeepSeek-V3.2's corrections.", argv).parse_args(argv)
    try:
        cfg = load_config(a.overrides, a.config_name, config_dir=a.config_dir)  # fails fast, before Ray or any model
        if a.cfg:
            print(to_yaml(cfg), end="")
            return 0
        held = rundir.lock(cfg.trainer.run_dir)  # one run per run dir, until this returns or the process dies
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with held, STOP:
        return run(cfg)


def run(cfg: Config) -> int:
    """Set up, prepare the run dir (resume or not), train; the exit code."""
    from rl.distill import demonstrations
    from rl.tracking import summary_table

    try:
        s = setup(cfg)
        resume = rundir.prepare(s.dir, cfg, to_yaml(cfg))
        demos = demonstrations(cfg, s.tok) if cfg.distill.enabled and not resume else {}
    except (ConfigError, DataError, FileNotFoundError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if AUTO_NOTES:
        print("auto settings: " + "; ".join(AUTO_NOTES), flush=True)
    progress.enable(cfg.logging.progress)
    try:
        tracker = _loop(s, resume, demos)
    except (RunError, LearnerFailure, StaleWeightsError, EngineLost) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        rundir.remove_weight_sync(s.dir)
    tracker.finish()
    if STOP.step is not None:
        print(f"stopped by {signal.Signals(STOP.signum).name} after step {STOP.step}: checkpoint at "
              f"{rundir.step_dir(Path(cfg.trainer.run_dir), STOP.step)}; rerun the same command to resume", file=sys.stderr)
        return 128 + STOP.signum
    keys = sorted({k for h in tracker.history for k in h if k.startswith(("reward/", "eval/", "train/kl", "train/opsm"))})
    print(summary_table(tracker.history, keys))
    print(f"run dir: {s.dir}  (metrics.jsonl, *.png, wandb/)")
    return 0


def _progress(cfg: Config, step: int, row: dict) -> None:
    if cfg.logging.progress:
        rewards = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in row.items() if k.endswith("/total"))
        print(f"[step {step}/{cfg.trainer.steps}] {rewards} loss={row.get('train/loss', 0):.4f} "
              f"kl={row.get('train/kl', 0):.2e} gen={row['time/generate']:.1f}s train={row['time/train']:.1f}s "
              f"sync={row['time/sync']:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
