"""Specialist distillation (V3.2 section 3.2): specialists' outputs, filtered by the rewards, SFT the
generalist; mixed RL follows in the same run.

A specialist is `rule` (the task family's rule-based solver, `rl.synthetic.solve`; for tool-use domains the
row's reference `solution` turns, played through the real tools by `rollout.agent.ScriptedPolicy`) or a HF
checkpoint path, whose outputs are generated with the rollout engines (as tool-use episodes for the
domains in `agent.domains`; tool results are in the SFT tokens with loss_mask 0). Either way the outputs are scored with the
domain's reward spec and only those whose primary reward is > 0.5 are kept. The SFT loss is token-mean
cross-entropy on the response tokens (`rl.algos` "sft"), in the same learner as RL.

Resumability: the driver skips distillation when a checkpoint exists (it is saved after SFT, before RL).
"""
from __future__ import annotations

import random

from dataclasses import replace

from rl import pipeline
from rl.synthetic import solve
from rollout.agent import AgentRunner, ScriptedPolicy, oracle_script
from rollout.engine import SamplingConfig
from rollout.sample import Sample, Status


class _Direct:
    """An in-process engine behind the RolloutManager interface (what `pipeline.generate` calls)."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts, sampling):
        from rollout.manager import GenerationStats

        return self.engine.generate(prompts, sampling), GenerationStats()


def specialist_samples(run, domain: str, specialist: str, prompts) -> list[Sample]:
    """SFT samples from one specialist."""
    agent = run.agent if run.agent is not None and domain in run.agent.domains else None
    r = run.cfg.rollout
    if specialist == "rule" and agent is None:
        return [to_sft_sample(run, p, solve(p.row)) for p in prompts]
    if specialist == "rule":
        missing = [p.source for p in prompts if not p.row.get("solution")]
        if missing:
            raise RuntimeError(f"distill.specialists.{domain}=rule needs each row's reference 'solution' turns; missing at {missing[0]}")
        oracle = ScriptedPolicy(run.tok, oracle_script({p.row["prompt"]: p.row["solution"] for p in prompts}))
        # Demonstrations are the clean solution: the whole context, no context management.
        plain = AgentRunner(run.tok, replace(agent.cfg, strategy="none", max_context=r.max_model_len), agent.domains)
        return pipeline.generate(_Direct(oracle), prompts, SamplingConfig(n=1, max_tokens=r.max_tokens), plain)[0]
    from rollout.engine import EngineConfig
    from rollout.manager import RolloutManager

    mgr = RolloutManager(EngineConfig(model=specialist, engine=r.engine, dtype=r.dtype, max_model_len=r.max_model_len),
                         num_engines=1, chunk_prompts=r.chunk_prompts, num_cpus=r.engine_cpus, num_gpus=r.engine_gpus)
    try:
        sp = SamplingConfig(n=run.cfg.distill.samples_per_prompt, temperature=r.temperature, max_tokens=r.max_tokens, seed=0)
        samples, _ = pipeline.generate(mgr, prompts, sp, agent)
    finally:
        mgr.shutdown()
    for s in samples:  # SFT: every generated token is a target (tool results stay out: loss_mask 0)
        s.logprobs = [0.0] * len(s.response_ids)
    return samples


def to_sft_sample(run, prompt, text: str) -> Sample:
    ids = list(run.tok(text, add_special_tokens=False)["input_ids"]) + [run.tok.eos_token_id]
    return Sample(prompt_ids=prompt.prompt_ids, response_ids=ids, logprobs=[0.0] * len(ids), loss_mask=[1] * len(ids),
                  status=Status.COMPLETED, domain=prompt.row["domain"], metadata=prompt.row, text=text)


def distill(run, learner) -> dict:
    cfg = run.cfg.distill
    kept, metrics = [], {}
    for domain, specialist in cfg.specialists.items():
        prompts = [p for p in run.train_prompts if p.row["domain"] == domain]
        samples = specialist_samples(run, domain, specialist, prompts)
        pipeline.score(samples, {domain: run.specs[domain]}, run.pool, run.tok)
        good = [s for s in samples if (s.rewards.get(run.specs[domain].primary) or 0.0) > 0.5]
        metrics[f"distill/{domain}/kept_frac"] = len(good) / max(len(samples), 1)
        kept.extend(seg for s in good for seg in (*s.segments, s) if seg.response_ids)
    if not kept:
        raise RuntimeError("distillation kept no sample: check distill.specialists and the reward specs")
    rng, losses = random.Random(0), []
    for step in range(cfg.dsa_warmup_steps):  # DSA dense warm-up: indexer only, main model frozen
        kl = learner.dsa_warmup_step(rng.sample(kept, min(cfg.batch_size, len(kept))), cfg.dsa_warmup_lr)
        metrics.setdefault("distill/dsa_warmup_kl_first", kl)
        metrics["distill/dsa_warmup_kl_last"] = kl
    learner.set_lr(cfg.lr)
    for _ in range(cfg.epochs):
        rng.shuffle(kept)
        for s in range(0, len(kept), cfg.batch_size):
            losses.append(learner.train_step(kept[s : s + cfg.batch_size], loss="sft")["nll"])
    learner.set_lr(run.cfg.trainer.lr)
    learner.reset_reference()  # RL's KL anchors to the distilled model, not the random init
    metrics.update({"distill/examples": len(kept), "distill/nll_first": losses[0], "distill/nll_last": losses[-1]})
    return metrics
