"""Specialist distillation (V3.2 section 3.2): specialists' outputs, filtered by the rewards, SFT the
generalist; mixed RL follows in the same run.

A specialist is `rule` (the task family's rule-based solver, `rl.synthetic.solve`; for tool-use domains the
row's reference `solution` turns, played through the real tools by `rollout.agent.ScriptedPolicy`) or a HF
checkpoint path, whose outputs are generated with the rollout engines (as tool-use episodes for the
domains in `agent.domains`; tool results are in the SFT tokens with loss_mask 0). Either way the outputs are scored with the
domain's reward spec and only those whose primary reward is > 0.5 are kept. The SFT loss is token-mean
cross-entropy on the response tokens (`rl.algos` "sft"), in the same learner as RL.

Or `data:<source>`: the user's own demonstrations (`demonstrations`), a prompt column (`data.prompt_key`)
and a response column (`distill.response_key`) in anything `data.train` takes. They are the user's ground
truth: not scored, not filtered (V3.2 filters its specialists' generations; a curated SFT set is taken as
it is). With `trainer.steps=0` the stage is the whole run: a plain SFT job (final eval, checkpoint, export).

Resumability: the driver skips distillation when a checkpoint exists (it is saved after SFT, before RL).
"""
from __future__ import annotations

import random
import sys
from dataclasses import replace

from rl import components, pipeline
from rl.data import DataError, Prompt, encode_prompt, load_source, map_columns
from rl.synthetic import solve
from rollout.agent import AgentRunner, ScriptedPolicy, oracle_script
from rollout.engine import SamplingConfig
from rollout.progress import bar
from rollout.sample import Sample, Status


def specialist_samples(cfg, tok, agent, domain: str, specialist: str, prompts) -> list[Sample]:
    """SFT samples from one specialist (`agent`: the tool-use runner when `domain` runs as episodes)."""
    rollout = cfg.rollout
    if specialist == "rule" and agent is None:
        return [to_sft_sample(tok, p, solve(p.row)) for p in prompts]
    if specialist == "rule":
        missing = [p.source for p in prompts if not p.row.get("solution")]
        if missing:
            raise RuntimeError(f"distill.specialists.{domain}=rule needs each row's reference 'solution' turns; missing at {missing[0]}")
        oracle = ScriptedPolicy(tok, oracle_script({p.row["prompt"]: p.row["solution"] for p in prompts}))
        # Demonstrations are the clean solution: the whole context, no context management.
        plain = AgentRunner(tok, replace(agent.cfg, strategy="none", max_context=rollout.max_model_len), agent.domains)
        return pipeline.flat(pipeline.generate(oracle, prompts, SamplingConfig(n=1, max_tokens=rollout.max_tokens), plain)[0])
    mgr = components.engines(cfg, specialist, want=components.Captures(routing=False, sampling_mask=False))
    try:
        sp = components.sampling(rollout, seed=0, n=cfg.distill.samples_per_prompt)
        samples = pipeline.flat(pipeline.generate(mgr, prompts, sp, agent)[0])
    finally:
        mgr.shutdown()
    for s in samples:  # SFT: every generated token is a target (tool results stay out: loss_mask 0)
        for seg in (*s.segments, s):
            seg.logprobs = [0.0] * len(seg.response_ids)
            seg.routed_experts = seg.kept = None  # the specialist's routing and truncation are not the student's
    return samples


def demonstrations(cfg, tok) -> dict[str, list[Sample]]:
    """SFT samples of every `data:` specialist, by domain (the driver loads them before Ray starts, so a
    missing file or column stops the run at once)."""
    return {dom: demonstration_samples(cfg, tok, dom, spec[len("data:"):])
            for dom, spec in cfg.distill.specialists.items() if spec.startswith("data:")}


def demonstration_samples(cfg, tok, domain: str, source: str) -> list[Sample]:
    """The (prompt, response) rows of `source` for `domain`, loaded and mapped like data.train
    (`rl.data.load_source` with data.split / data.subset, `map_columns` with data.prompt_key; rows without a
    domain are `domain`'s, rows of other domains are left out). A row whose prompt or response is missing, or
    that does not fit rollout.max_model_len, stops the run with file:row (skipped and counted with
    data.skip_bad_rows=true)."""
    d, key = cfg.data, cfg.distill.response_key
    ds = map_columns(load_source(source, d.split, d.subset, key=f"distill.specialists.{domain}"), source, d.prompt_key,
                     domain=domain)
    if key not in ds.column_names:
        raise DataError(f"{source}: no column {key!r} with the responses (distill.response_key; columns: {ds.column_names})")
    samples, skipped = [], []
    for i, row in enumerate(ds, 1):
        if row["domain"] != domain:
            continue
        where, response = f"{source}:{i}", row[key]
        problem, sample = None, None
        if not isinstance(response, str) or not response.strip():
            problem = f"empty or missing response ({key!r}, distill.response_key)"
        elif not isinstance(row.get("prompt"), (str, list)) or not row["prompt"]:
            problem = f"missing prompt ({d.prompt_key!r}, data.prompt_key)"
        else:
            sample = to_sft_sample(tok, Prompt(row, encode_prompt(tok, row, d.system_prompt), where), response)
            length = len(sample.prompt_ids) + len(sample.response_ids)
            if length > cfg.rollout.max_model_len:
                problem = f"prompt + response have {length} tokens, more than rollout.max_model_len={cfg.rollout.max_model_len}"
        if problem is None:
            samples.append(sample)
        elif d.skip_bad_rows:
            skipped.append(f"{where}: {problem}")
        else:
            raise DataError(f"{where}: {problem}")
    if skipped:
        print(f"distill: skipped {len(skipped)} rows of {source} (data.skip_bad_rows=true): {skipped[0]}", file=sys.stderr)
    if not samples:
        raise DataError(f"{source}: no usable demonstration for domain {domain!r} (distill.specialists.{domain})")
    return samples


def to_sft_sample(tok, prompt, text: str) -> Sample:
    ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return Sample(prompt_ids=prompt.prompt_ids, response_ids=ids, logprobs=[0.0] * len(ids), loss_mask=[1] * len(ids),
                  status=Status.COMPLETED, domain=prompt.row["domain"], metadata=prompt.row, text=text)


def distill(cfg, tok, specs: dict, pool, agent, train_prompts: list, learner, demos: dict | None = None) -> dict:
    """Specialists' filtered outputs and the `demos` (`demonstrations`, by domain) SFT the learner
    (`cfg.distill`), then its reference is reset to the result. Returns the stage's metrics."""
    distill_cfg = cfg.distill
    kept, metrics = [], {}
    for domain, specialist in distill_cfg.specialists.items():
        if specialist.startswith("data:"):
            samples = good = (demos or {})[domain]  # the user's demonstrations: taken as they are
        else:
            prompts = [p for p in train_prompts if p.row["domain"] == domain]
            runner = agent if agent is not None and domain in agent.domains else None
            samples = specialist_samples(cfg, tok, runner, domain, specialist, prompts)
            pipeline.score(samples, {domain: specs[domain]}, pool, tok)
            good = [s for s in samples if (s.rewards.get(specs[domain].primary) or 0.0) > 0.5]
        metrics[f"distill/{domain}/kept_frac"] = len(good) / max(len(samples), 1)
        kept.extend(seg for s in good for seg in (*s.segments, s) if seg.response_ids)
    if not kept:
        raise RuntimeError("distillation kept no sample: check distill.specialists and the reward specs")
    rng, losses = random.Random(0), []
    for _ in range(distill_cfg.dsa_warmup_steps):  # DSA dense warm-up: indexer only, main model frozen
        kl = learner.dsa_warmup_step(rng.sample(kept, min(distill_cfg.batch_size, len(kept))), distill_cfg.dsa_warmup_lr)
        metrics.setdefault("distill/dsa_warmup_kl_first", kl)
        metrics["distill/dsa_warmup_kl_last"] = kl
    learner.set_lr(distill_cfg.lr)
    shown = bar(distill_cfg.epochs * -(-len(kept) // distill_cfg.batch_size), "distill (SFT)", unit="batch")
    for _ in range(distill_cfg.epochs):
        rng.shuffle(kept)
        for s in range(0, len(kept), distill_cfg.batch_size):
            losses.append(learner.train_step(kept[s : s + distill_cfg.batch_size], loss="sft")["nll"])
            shown.set_postfix(nll=f"{losses[-1]:.3f}", refresh=False)
            shown.update()
    shown.close()
    learner.set_lr(cfg.trainer.lr)
    learner.reset_reference()  # RL's KL anchors to the distilled model, not the random init
    metrics.update({"distill/examples": len(kept), "distill/nll_first": losses[0], "distill/nll_last": losses[-1]})
    return metrics
