"""The driver: `python -m rl.train [--config-name NAME] [key=value ...]` (Hydra overrides).

    generate -> score -> advantages -> train -> sync weights -> log -> checkpoint

`main` is the loop, on one screen; `Run` holds the set-up (config, run dir, tokenizer, data, scorers,
workers) and the steps that need several of them. Sync mode trains on samples from the current weights;
async mode generates step k+1's samples while step k trains (staleness 1, bounded by
`trainer.max_staleness`; older samples are dropped and counted).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from rl import pipeline
from rl.cluster import ray_session
from rl.config import Config, ConfigError, agent_runner, domain_betas, load_config
from rl.data import DataError, PromptStream, load_prompts
from rl.learner import LearnerFailure
from rollout.manager import StaleWeightsError


class RunError(RuntimeError):
    """The run stopped on purpose (failure budget, NaN budget); the message says why."""


@dataclass
class Batch:
    samples: list
    metrics: dict
    position: dict  # data position after this batch's prompts (saved when the batch is trained)
    seconds: float
    sources: list  # file:row of each prompt


class Run:
    def __init__(self, cfg: Config, for_eval: bool = False):
        from transformers import AutoTokenizer

        from rewards import parse_specs
        from rewards.pool import ScoringPool
        from rollout.tiny_models import build_tiny_model

        self.cfg, self.dir = cfg, Path(cfg.trainer.run_dir)
        self.model_path = cfg.model.path or str(self.dir / "model_init")
        if cfg.model.tiny and not (Path(self.model_path) / "config.json").is_file():
            build_tiny_model(cfg.model.tiny, self.model_path, seed=cfg.model.seed, dsa_top_k=cfg.model.dsa_top_k,
                             **cfg.model.tiny_overrides)
        self.tok = AutoTokenizer.from_pretrained(self.model_path)
        self.specs = parse_specs(cfg.rewards)
        room = cfg.rollout.max_model_len - cfg.rollout.max_tokens
        load = lambda p: load_prompts(p, self.tok, self.specs, room, cfg.data.skip_bad_rows, cfg.data.system_prompt)  # noqa: E731
        self.train_prompts, self.skipped = ([], []) if for_eval else load(cfg.data.train)
        self.eval_prompts = load(cfg.data.eval)[0][: cfg.eval.max_prompts] if cfg.data.eval else []
        self.pool = ScoringPool(timeout_s=30.0)
        self.betas = domain_betas(cfg, self.specs)
        self.agent = agent_runner(cfg, self.tok)  # tool-use episodes for cfg.agent.domains
        self.ckpt = self.dir / "checkpoints" / "latest"
        self._engines = None

    @classmethod
    def create(cls, overrides: list[str], config_name: str = "config", for_eval: bool = False) -> "Run":
        return cls(load_config(overrides, config_name), for_eval)

    def engines(self, model: str | None = None):
        from rollout.engine import EngineConfig
        from rollout.manager import RolloutManager

        if self._engines is None:
            r = self.cfg.rollout
            ecfg = EngineConfig(model=model or self.model_path, engine=r.engine, dtype=r.dtype,
                                max_model_len=r.max_model_len, seed=self.cfg.trainer.seed)
            self._engines = RolloutManager(ecfg, r.num_engines, r.chunk_prompts, num_cpus=r.engine_cpus, num_gpus=r.engine_gpus)
        return self._engines

    def learner(self):
        from rl.learner import LearnerConfig, LearnerGroup

        a, t = self.cfg.algo, self.cfg.trainer
        lcfg = LearnerConfig(model=self.model_path, lr=t.lr, warmup_steps=t.warmup_steps, grad_clip=t.grad_clip,
                             micro_batch_size=t.micro_batch_size, logprob_chunk=t.logprob_chunk, loss=a.name,
                             clip_eps=a.clip_eps, clip_eps_high=a.clip_eps_high, kl_estimator=a.kl_estimator,
                             opsm_delta=a.opsm_delta, aggregation=a.aggregation, keep_routing=a.keep_routing,
                             keep_sampling_mask=a.keep_sampling_mask, temperature=self.cfg.rollout.temperature,
                             kl_coefs=self.betas, seed=t.seed, dsa_loss=a.dsa_loss, dsa_loss_coef=a.dsa_loss_coef)
        return LearnerGroup(lcfg, t.world_size, num_cpus=t.learner_cpus, num_gpus=t.learner_gpus)

    def collect(self, stream: PromptStream, step: int) -> Batch:
        """Prompts -> n samples each -> rewards -> advantages (runs in a thread in async mode)."""
        t0, r = time.time(), self.cfg.rollout
        prompts = stream.next(self.cfg.data.prompts_per_step)
        sampling_cfg = _sampling(r, seed=self.cfg.trainer.seed * 100_003 + step)
        samples, gen = pipeline.generate(self.engines(), prompts, sampling_cfg, self.agent)
        t1 = time.time()
        rew = pipeline.score(samples, self.specs, self.pool, self.tok)
        adv = pipeline.assign_advantages(samples, len(prompts), r.n, self.cfg.algo.advantage)
        from rewards import take_events

        events = {f"events/{k}": v for k, v in take_events().items()}
        timing = {"time/generate": t1 - t0, "time/score": time.time() - t1}
        return Batch(samples, {**gen, **rew, **adv, **events, **timing}, stream.position, time.time() - t0,
                     [p.source for p in prompts])

    def sync(self, learner, version: int) -> float:
        """Learner weights -> /dev/shm checkpoint -> every engine; versions are checked (StaleWeightsError)."""
        from rollout.weights import default_sync_root

        t0 = time.time()
        path = learner.export_hf(str(default_sync_root() / f"v32rl-sync-{self.dir.resolve().name}"), version=version)
        self.engines().update_weights(path, version)
        return time.time() - t0

    def evaluate(self, engines) -> dict:
        from rl.eval import evaluate

        if not self.eval_prompts:
            return {}
        e = self.cfg.eval
        return evaluate(engines, self.eval_prompts, self.specs, self.pool, self.tok, e.k, e.temperature,
                        self.cfg.rollout.max_tokens, seed=self.cfg.trainer.seed, agent=self.agent)

    def save(self, learner, step: int, position: dict) -> None:
        learner.save_checkpoint(str(self.ckpt), {"step": step, "data_position": position})


def _sampling(r, seed: int):
    from rollout.engine import SamplingConfig

    return SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens, seed=seed)


def check_budgets(batch: Batch, metrics: dict, cfg: Config, nonfinite: int) -> int:
    """Count NaN/inf steps and stop when a budget is exceeded (RunError names the count)."""
    bad = [s for s in batch.samples if s.reward is None]
    if batch.samples and len(bad) / len(batch.samples) > cfg.trainer.max_failure_rate:
        raise RunError(f"{len(bad)} of {len(batch.samples)} samples failed or abstained this step "
                       f"(> trainer.max_failure_rate={cfg.trainer.max_failure_rate})")
    if not math.isfinite(metrics.get("loss", 0.0)) or metrics.get("skipped", 0.0):
        nonfinite += 1
        if nonfinite > cfg.trainer.max_nonfinite_steps:
            raise RunError(f"{nonfinite} steps had a non-finite loss or gradient (> trainer.max_nonfinite_steps)")
    return nonfinite


def _loop(cfg: Config, run: Run, resume: bool):
    from rl.distill import distill
    from rl.tracking import Tracker

    with ray_session(cfg.cluster), ThreadPoolExecutor(1) as bg:
        learner, engines = run.learner(), run.engines()
        state = learner.load_checkpoint(str(run.ckpt)) if resume else {"step": 0, "data_position": None}
        tracker = Tracker(str(run.dir), cfg, resume_step=state["step"] if resume else None)
        stream = PromptStream(run.train_prompts, cfg.data.shuffle_seed)
        if state["data_position"]:
            stream.restore(state["data_position"])
        if cfg.distill.enabled and not resume:
            tracker.log(0, {"_kind": "distill", **distill(run, learner)})
        if resume or cfg.distill.enabled:
            run.sync(learner, version=state["step"])
        if not resume:
            tracker.log(0, {"_kind": "eval", **run.evaluate(engines)})
        nonfinite, t_last = 0, time.time()
        pending = bg.submit(run.collect, stream, state["step"]) if state["step"] < cfg.trainer.steps else None
        for step in range(state["step"], cfg.trainer.steps):
            batch = pending.result()
            if cfg.trainer.mode == "async" and step + 1 < cfg.trainer.steps:
                pending = bg.submit(run.collect, stream, step + 1)  # generates while this step trains
            fresh = [s for s in pipeline.trainable(batch.samples) if step - s.policy_version <= cfg.trainer.max_staleness]
            t0 = time.time()
            metrics = learner.train_step(fresh) if fresh else {"loss": 0.0}
            t_train = time.time() - t0
            t_sync = run.sync(learner, version=step + 1)
            nonfinite = check_budgets(batch, metrics, cfg, nonfinite)
            if cfg.trainer.mode == "sync" and step + 1 < cfg.trainer.steps:
                pending = bg.submit(run.collect, stream, step + 1)
            row = {**batch.metrics, **{f"train/{k}": v for k, v in metrics.items()}, "time/train": t_train,
                   "time/sync": t_sync, "rollout/stale_dropped": len(pipeline.trainable(batch.samples)) - len(fresh),
                   "time/step": time.time() - t_last}  # wall since the previous step's row (async overlap shows here)
            t_last = time.time()
            if cfg.trainer.eval_every and (step + 1) % cfg.trainer.eval_every == 0 and step + 1 < cfg.trainer.steps:
                row.update(run.evaluate(engines))
            tracker.log(step + 1, row)
            tracker.log_consumed(step + 1, batch.sources)
            _progress(cfg, step + 1, row)
            if cfg.trainer.save_every and (step + 1) % cfg.trainer.save_every == 0:
                run.save(learner, step + 1, batch.position)
        final = run.evaluate(engines)
        tracker.log(cfg.trainer.steps, {"_kind": "eval", **final})
        run.save(learner, cfg.trainer.steps, stream.position)  # nothing is in flight after the last step
        learner.export_hf(str(run.dir / "final_model"))
        learner.shutdown()
    return tracker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GRPO with DeepSeek-V3.2's corrections.")
    p.add_argument("--config-name", default="config")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.kl_coef=0.01 rollout.n=8")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.overrides, a.config_name)  # fails fast, before Ray or any model starts
        run = Run(cfg)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rl.tracking import summary_table
    from rollout.weights import recover_dir

    note = recover_dir(run.ckpt)  # a crash during the last checkpoint write
    if note:
        print(f"checkpoint recovery: {note}", file=sys.stderr)
    resume = (run.ckpt / "COMPLETE").is_file()
    try:
        tracker = _loop(cfg, run, resume)
    except (RunError, LearnerFailure, StaleWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    tracker.finish()
    keys = sorted({k for h in tracker.history for k in h if k.startswith(("reward/", "eval/", "train/kl", "train/opsm"))})
    print(summary_table(tracker.history, keys))
    print(f"run dir: {run.dir}  (metrics.jsonl, *.png, wandb/)")
    return 0


def _progress(cfg: Config, step: int, row: dict) -> None:
    if cfg.logging.progress:
        rewards = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in row.items() if k.endswith("/total"))
        print(f"[step {step}/{cfg.trainer.steps}] {rewards} loss={row.get('train/loss', 0):.4f} "
              f"kl={row.get('train/kl', 0):.2e} gen={row['time/generate']:.1f}s train={row['time/train']:.1f}s "
              f"sync={row['time/sync']:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
