"""Evaluation with the training scorers: greedy accuracy, pass@k and maj@k from k samples, response length
and language consistency, per domain. `python -m rl.eval --checkpoint DIR [overrides]` evaluates any HF
checkpoint with the same config machinery as training.

"Correct" is the domain's primary reward dimension above 0.5 (1/0 rule scorers). maj@k takes the most
common final answer (last `\\boxed{}`, else the text after `</think>`) among the k samples and counts the
prompt as solved when a sample giving that answer is correct.
"""
from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from rewards.rule import final_answer
from rl import pipeline
from rl.data import Prompt
from rollout.engine import SamplingConfig


def _correct(s, spec) -> bool:
    v = s.rewards.get(spec.primary) if s.rewards else None
    return v is not None and v > 0.5


def evaluate(engines, prompts: list[Prompt], specs: dict, pool, tokenizer, k: int, temperature: float,
             max_tokens: int, seed: int = 0, agent=None) -> dict[str, float]:
    out: dict[str, float] = {}
    greedy, _ = pipeline.generate(engines, prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens), agent)
    pipeline.score(greedy, specs, pool, tokenizer)
    sampled, _ = pipeline.generate(engines, prompts, SamplingConfig(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed), agent)
    pipeline.score(sampled, specs, pool, tokenizer)
    groups = defaultdict(list)
    for s in sampled:
        groups[s.prompt_index].append(s)
    for domain, spec in specs.items():
        g = [s for s in greedy if s.domain == domain]
        if not g:
            continue
        out[f"eval/{domain}/greedy_acc"] = sum(_correct(s, spec) for s in g) / len(g)
        out[f"eval/{domain}/response_length"] = sum(len(s.response_ids) for s in g) / len(g)
        lang = [s.rewards.get("language") for s in g if s.rewards and s.rewards.get("language") is not None]
        if lang:
            out[f"eval/{domain}/language_consistency"] = sum(lang) / len(lang)
        if any(s.tool_stats for s in g):
            out[f"eval/{domain}/tool_calls"] = sum(s.tool_stats.get("tool_calls", 0) for s in g) / len(g)
        idx = [s.prompt_index for s in g]
        out[f"eval/{domain}/pass@{k}"] = sum(any(_correct(s, spec) for s in groups[i]) for i in idx) / len(idx)
        maj = 0
        for i in idx:
            answers = Counter(final_answer(s.text or "") for s in groups[i])
            top = answers.most_common(1)[0][0]
            maj += any(final_answer(s.text or "") == top and _correct(s, spec) for s in groups[i])
        out[f"eval/{domain}/maj@{k}"] = maj / len(idx)
    return out


def evaluate_setup(s, engines) -> dict:
    """`evaluate` on a run's eval prompts (`rl.components.Setup`), with its eval settings."""
    if not s.eval_prompts:
        return {}
    e, r = s.cfg.eval, s.cfg.rollout
    return evaluate(engines, s.eval_prompts, s.specs, s.pool, s.tok, e.k, e.temperature, r.max_tokens,
                    seed=s.cfg.trainer.seed, agent=s.agent)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate a HF checkpoint on the config's eval data.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config-name", default="config")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from rl import components
    from rl.cluster import ray_session
    from rl.config import load_config

    overrides = [o for o in a.overrides if not o.startswith(("model.path=", "model.tiny="))]
    cfg = load_config(overrides + [f"model.path={a.checkpoint}", "model.tiny=null"], a.config_name)
    s = components.setup(cfg, for_eval=True)
    with ray_session(cfg.cluster):
        metrics = evaluate_setup(s, components.engines(cfg, s.model_path))
    for key in sorted(metrics):
        print(f"{key:40s} {metrics[key]:.4f}")


if __name__ == "__main__":
    main()
