"""The steps of the loop that the driver, evaluation and distillation share: generate, score, advantages."""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from rl.algos import compute_advantages
from rl.data import Prompt
from rollout.engine import SamplingConfig
from rollout.sample import Sample, Status


def generate(engines, prompts: list[Prompt], sampling: SamplingConfig) -> tuple[list[Sample], dict]:
    """n samples per prompt, each tagged with its prompt's domain and row."""
    samples, stats = engines.generate([p.prompt_ids for p in prompts], sampling)
    for s in samples:
        p = prompts[s.prompt_index]
        s.domain, s.metadata = p.row["domain"], p.row
    return samples, {"rollout/chunks": stats.chunks, "rollout/engine_restarts": stats.restarts,
                     "rollout/aborted": stats.aborted_samples}


def score(samples: list[Sample], specs: dict, pool, tokenizer) -> dict:
    """Fill `rewards` (per dimension) and `reward` (scalar; None = abstained) of every sample."""
    by_domain: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.status in (Status.COMPLETED, Status.TRUNCATED):
            s.text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
            by_domain[s.domain].append(s)
    for domain, group in by_domain.items():
        spec = specs[domain]
        keys = sorted({k for s in group for k in s.metadata if k != "prompt"})
        cols = {k: [s.metadata.get(k) for s in group] for k in keys}
        cols["prompt"] = [_prompt_text(s.metadata["prompt"]) for s in group]
        cols["num_tokens"] = [len(s.response_ids) for s in group]
        cols["truncated"] = [s.status is Status.TRUNCATED for s in group]
        for s, vec in zip(group, pool.score(spec, [s.text for s in group], cols)):
            s.rewards, s.reward = vec, spec.combine(vec)
    return reward_metrics(samples, specs)


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt if m["role"] == "user")


def reward_metrics(samples: list[Sample], specs: dict) -> dict:
    out: dict[str, float] = {}
    for domain, spec in specs.items():
        group = [s for s in samples if s.domain == domain]
        if not group:
            continue
        rewards = [s.reward for s in group if s.reward is not None]
        out[f"reward/{domain}/total"] = sum(rewards) / len(rewards) if rewards else float("nan")
        for d in spec.dimensions:
            vals = [s.rewards.get(d.name) for s in group if s.rewards.get(d.name) is not None]
            if vals:
                out[f"reward/{domain}/{d.name}"] = sum(vals) / len(vals)
        out[f"rollout/{domain}/response_length"] = sum(len(s.response_ids) for s in group) / len(group)
    done = [s for s in samples if s.status in (Status.COMPLETED, Status.TRUNCATED)]
    out["rollout/response_length"] = sum(len(s.response_ids) for s in done) / max(len(done), 1)
    out["rollout/truncated_frac"] = sum(s.status is Status.TRUNCATED for s in samples) / max(len(samples), 1)
    out["rollout/abstained"] = sum(s.reward is None for s in done)
    return out


def assign_advantages(samples: list[Sample], num_prompts: int, n: int, name: str) -> dict:
    """Group-relative advantages; abstained samples (reward None) are excluded and counted."""
    rewards = torch.full((num_prompts, n), math.nan, dtype=torch.float64)
    slot = defaultdict(int)
    where = []
    for s in samples:
        j = slot[s.prompt_index]
        slot[s.prompt_index] += 1
        where.append((s.prompt_index, j))
        if s.reward is not None:
            rewards[s.prompt_index, j] = s.reward
    adv, stats = compute_advantages(name, rewards)
    for s, (i, j) in zip(samples, where):
        s.advantage = float(adv[i, j])
    return {"adv/abstained": stats.num_abstained, "adv/degenerate_groups": stats.num_degenerate_groups,
            "adv/abs_mean": float(adv.abs().mean())}


def trainable(samples: list[Sample]) -> list[Sample]:
    """What enters the loss: generated, scored samples (abstained and failed ones are counted, not trained)."""
    return [s for s in samples if s.status in (Status.COMPLETED, Status.TRUNCATED) and s.reward is not None
            and len(s.response_ids) > 0]
