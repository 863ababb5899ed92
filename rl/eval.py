"""Evaluation with the training scorers: greedy accuracy, pass@k and maj@k from k samples, response length
and language consistency, per domain. `python -m rl.eval --checkpoint DIR [--config-dir DIR] [overrides]`
evaluates any HF checkpoint with the same config machinery as training.

"Correct" is the domain's primary reward dimension above 0.5 (1/0 rule scorers). maj@k takes the most
common final answer (last `\\boxed{}`, else the text after `</think>`) among the k samples and counts the
prompt as solved when a sample giving that answer is correct.
"""
from __future__ import annotations

import sys
from collections import Counter

from rewards.rule import final_answer
from rl import pipeline
from rl.data import Prompt
from rollout.engine import SamplingConfig
from rollout.progress import bar


def _correct(s, spec) -> bool:
    v = s.rewards.get(spec.primary) if s.rewards else None
    return v is not None and v > 0.5


def evaluate(engines, prompts: list[Prompt], specs: dict, pool, tokenizer, k: int, temperature: float,
             max_tokens: int, seed: int = 0, agent=None, keep: list | None = None) -> dict[str, float]:
    """The metrics; `keep` (a list) receives the greedy samples, scored."""
    out: dict[str, float] = {}
    shown = bar(len(prompts) * (1 + k), "eval", unit="sample")
    greedy = pipeline.flat(pipeline.generate(engines, prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens), agent)[0])
    pipeline.score(greedy, specs, pool, tokenizer)
    shown.update(len(greedy))
    groups, _ = pipeline.generate(engines, prompts, SamplingConfig(n=k, temperature=temperature, max_tokens=max_tokens, seed=seed), agent)
    pipeline.score(pipeline.flat(groups), specs, pool, tokenizer)
    shown.update(len(prompts) * k)
    shown.close()
    if keep is not None:
        keep.extend(greedy)
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
    """`evaluate` on a run's eval prompts (`rl.components.Setup`), with its eval settings; the greedy
    completions ride along under `eval/completions` (`rl.tracking.Completions`: W&B table, completions.jsonl)."""
    from rl.tracking import Completions

    if not s.eval_prompts:
        return {}
    e, r, greedy = s.cfg.eval, s.cfg.rollout, []
    metrics = evaluate(engines, s.eval_prompts, s.specs, s.pool, s.tok, e.k, e.temperature, r.max_tokens,
                       seed=s.cfg.trainer.seed, agent=s.agent, keep=greedy)
    return {**metrics, "eval/completions": Completions.of(greedy)}


def main(argv: list[str] | None = None) -> int:
    from rl import components
    from rl.cluster import ray_session
    from rl.config import ConfigError, cli_parser, load_config, to_yaml
    from rl.data import DataError
    from rollout import progress

    p = cli_parser("Evaluate a HF checkpoint on the config's eval data.", argv)
    p.add_argument("--checkpoint", required=True, help="a HF checkpoint directory (e.g. RUN_DIR/final_model)")
    a = p.parse_args(argv)
    overrides = [o for o in a.overrides if not o.startswith(("model.path=", "model.tiny="))]
    try:
        cfg = load_config(overrides + [f"model.path={a.checkpoint}", "model.tiny=null"], a.config_name, config_dir=a.config_dir)
        if a.cfg:
            print(to_yaml(cfg), end="")
            return 0
        s = components.setup(cfg, for_eval=True)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress.enable(cfg.logging.progress)
    with ray_session(cfg.cluster):
        metrics = evaluate_setup(s, components.engines(cfg, s.model_path))
    for key in sorted(k for k, v in metrics.items() if isinstance(v, (int, float))):
        print(f"{key:40s} {metrics[key]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
