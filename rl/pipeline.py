"""The steps of the loop that the driver, evaluation and distillation share: generate, score, advantages."""
from __future__ import annotations

import contextvars
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from rl.algos import compute_advantages
from rl.data import Prompt
from rollout.agent import final_turn_ids
from rollout.engine import GenerationStats, Generator, Groups, SamplingConfig, check_groups
from rollout.sample import Sample, Status


def generate(generator: Generator, prompts: list[Prompt], sampling: SamplingConfig, agent=None) -> tuple[Groups, dict]:
    """n samples per prompt, grouped by prompt, each tagged with its prompt's index, domain and row. Prompts of
    `agent.domains` (an `rollout.agent.AgentRunner`) run as tool-use episodes on the same generator."""
    is_tool = [agent is not None and p.row["domain"] in agent.domains for p in prompts]
    groups: Groups = [[] for _ in prompts]
    stats = GenerationStats()
    for tool in (False, True):
        idx = [i for i, t in enumerate(is_tool) if t is tool]
        if idx:
            gen = agent.on(generator) if tool else generator
            for i, g in zip(idx, gen.generate([prompts[i].prompt_ids for i in idx], sampling, stats)):
                groups[i] = g
    check_groups(groups, len(prompts), sampling.n)
    for i, (p, g) in enumerate(zip(prompts, groups)):
        for s in g:
            for x in (*s.segments, s):
                x.prompt_index, x.domain, x.metadata = i, p.row["domain"], p.row
    metrics = {"rollout/chunks": stats.chunks, "rollout/engine_restarts": stats.restarts,
               "rollout/aborted": stats.aborted_samples}
    if any(is_tool):
        metrics.update(agent_metrics([s for t, g in zip(is_tool, groups) if t for s in g]))
    return groups, metrics


def flat(groups: Groups) -> list[Sample]:
    return [s for g in groups for s in g]


def agent_metrics(samples: list[Sample]) -> dict:
    """Per-episode means of the tool-use counters; context-management firings as totals per step."""
    keys = sorted({k for s in samples for k in s.tool_stats})
    out = {f"agent/{k}": sum(s.tool_stats.get(k, 0) for s in samples) for k in keys if k.startswith("context/")}
    out.update({f"agent/{k}": sum(s.tool_stats.get(k, 0) for s in samples) / len(samples)
                for k in keys if not k.startswith("context/")})
    return out


def score(samples: list[Sample], specs: dict, pool, tokenizer) -> dict:
    """Fill `rewards` (per dimension) and `reward` (scalar; None = abstained) of every sample. Returns the
    reward metrics and this call's scoring events (`events/<scorer>:<reason>`), counted apart from any other
    scoring running at the same time (an evaluation thread in async mode)."""
    from rewards import collect_events

    by_domain: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.status in (Status.COMPLETED, Status.TRUNCATED):
            s.text = tokenizer.decode(_scored_ids(s), skip_special_tokens=True)
            by_domain[s.domain].append(s)

    def one(domain: str, group: list[Sample]) -> Counter:
        spec = specs[domain]
        keys = sorted({k for s in group for k in s.metadata if k != "prompt"})
        cols = {k: [s.metadata.get(k) for s in group] for k in keys}
        cols["prompt"] = [_prompt_text(s.metadata["prompt"]) for s in group]
        cols["prompts"] = [s.metadata["prompt"] for s in group]  # TRL's argument: the prompt as in the data
        cols["completion_ids"] = [_scored_ids(s) for s in group]
        cols["num_tokens"] = [len(s.response_ids) for s in group]
        cols["truncated"] = [s.status is Status.TRUNCATED for s in group]
        with collect_events() as events:
            vectors = pool.score(spec, [s.text for s in group], cols)
        for s, vec in zip(group, vectors):
            s.rewards, s.reward = vec, spec.combine(vec)
        return Counter(events)

    # Domains at once (each in a copy of this context, counting its own events): the step waits for the
    # slowest domain, not for their sum (each dimension's child is forked and scored on its own). Scorers are
    # warmed first, here: no domain's fork may happen while another domain's thread imports.
    for domain in by_domain:
        pool.warm(specs[domain])
    with ThreadPoolExecutor(max(1, len(by_domain)), thread_name_prefix="score-domain") as ex:
        futures = [ex.submit(contextvars.copy_context().run, one, d, g) for d, g in by_domain.items()]
        counted = sum((f.result() for f in futures), Counter())
    return {**reward_metrics(samples, specs), **{f"events/{k}": v for k, v in sorted(counted.items())}}


def _scored_ids(s: Sample) -> list[int]:
    """The tokens a sample is judged by: an episode's final turn (the answer; its tool turns are in the same
    tokens), otherwise the whole response."""
    return list(final_turn_ids(s) if s.tool_stats else s.response_ids)


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


def assign_advantages(groups: Groups, name: str) -> dict:
    """Group-relative advantages; abstained samples (reward None) are excluded and counted."""
    rewards = torch.tensor([[math.nan if s.reward is None else s.reward for s in g] for g in groups], dtype=torch.float64)
    adv, stats = compute_advantages(name, rewards)
    for g, row in zip(groups, adv.tolist()):
        for s, a in zip(g, row):
            s.advantage = a
    return {"adv/abstained": stats.num_abstained, "adv/degenerate_groups": stats.num_degenerate_groups,
            "adv/abs_mean": float(adv.abs().mean())}


def trainable(samples: list[Sample]) -> list[Sample]:
    """What enters the loss: generated, scored samples (abstained and failed ones are counted, not trained),
    each preceded by its episode's earlier segments, which take its reward and advantage."""
    out = []
    for s in samples:
        if s.status in (Status.COMPLETED, Status.TRUNCATED) and s.reward is not None and len(s.response_ids) > 0:
            for seg in s.segments:
                seg.reward, seg.advantage = s.reward, s.advantage
            out += [seg for seg in s.segments if seg.response_ids] + [s]
    return out
