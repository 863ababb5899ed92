"""Context management (V3.2 section 4.4): what happens when an episode's context reaches `trigger` (80%)
of `max_context` tokens.

Every strategy is one `ContextStrategy` registered in `CONTEXT_STRATEGIES`; the runner calls its `width`,
`manage` and `select` and never branches on the name. Each firing is counted in the episode's `tool_stats`
(`context/<name>`).

- `none`: nothing; an episode that fills its budget ends truncated ("context").
- `discard_75`, `discard_all`: drop the oldest 75% / all of the tool-call turns and continue.
- `summary`: the policy summarises its work; the episode restarts from the question and the summary.
- `parallel_fewest_steps`: the paper's baseline; `parallel` candidates per sample, nothing done at the
  trigger, the finished candidate with the fewest steps kept.

Deviations and limits:
- The paper uses context management at test time (BrowseComp); here it also runs in training rollouts.
  A managed context is no longer a prefix of what came before, so each firing closes a training segment:
  an episode yields several `Sample`s (the last one carries the reward; `Sample.segments` holds the earlier
  ones, which share its advantage). The summary the model writes is trained too (its own segment).
- `summary` asks the policy itself (no separate summariser) and restarts from the question with the
  summary as the beginning of the assistant's turn (the summary's tokens are reused, not re-tokenised).
- `parallel_fewest_steps` trains only the kept candidate; the others' generation is spent for selection.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from rewards.registry import Registry
from rollout.agent.episode import SUMMARY_PREFIX, Episode, EpisodeConfig, _Segment
from rollout.sample import Sample, Status

if TYPE_CHECKING:
    from rollout.agent.runner import AgentRunner

CONTEXT_STRATEGIES: Registry = Registry("context strategy")


@dataclass(frozen=True)
class ContextStrategy:
    """The protocol, with the defaults of `none`: one candidate per sample, nothing done at the trigger."""

    def width(self, cfg: EpisodeConfig) -> int:
        """Candidate episodes run per sample."""
        return 1

    def manage(self, runner: AgentRunner, generate_fn, full: list[Episode], sampling, turn: int) -> None:
        """Act on the live episodes whose context reached the trigger, before the turn's engine calls;
        `generate_fn(prompts, sampling) -> list[Sample]` gives n samples per prompt, in the prompts' order."""

    def select(self, candidates: list[Episode]) -> Episode:
        """The candidate kept for the sample, out of `width` of them."""
        return candidates[0]


CONTEXT_STRATEGIES.register("none")(ContextStrategy())


def discard_75(ep: Episode) -> list[list[int]]:
    """Drop the oldest 75% of the tool-call turns (rounded down, at least one), keep the rest."""
    return ep.turns[max(1, int(0.75 * len(ep.turns))) :]


def discard_all(ep: Episode) -> list[list[int]]:
    """Drop every tool-call turn: back to the question."""
    return []


@dataclass(frozen=True)
class Discard(ContextStrategy):
    """Restart from the episode's base with the turns `keep` leaves (registered under `keep`'s name)."""

    keep: Callable[[Episode], list[list[int]]]

    def manage(self, runner, generate_fn, full, sampling, turn):
        for e in full:
            e.restart(e.base, self.keep(e))
            e.stats[f"context/{self.keep.__name__}"] += 1


for _keep in (discard_75, discard_all):
    CONTEXT_STRATEGIES.register(_keep.__name__)(Discard(_keep))


@dataclass(frozen=True)
class Summary(ContextStrategy):
    """Ask the policy for a summary (a `SUMMARY_REQUEST` user turn in place of the last generation prompt, at
    most `summary_tokens`), then restart from the question + `SUMMARY_PREFIX` + the summary's tokens. An
    episode with no room left to ask ends there."""

    def manage(self, runner, generate_fn, full, sampling, turn):
        cfg = runner.cfg
        asks: dict[int, list] = {}
        for e in full:
            ask = runner.summary_ask(e.stream)
            room = min(cfg.summary_tokens, cfg.max_context - len(ask))
            if room < 8:
                e.finish(Status.TRUNCATED, "context")
            else:
                asks.setdefault(room, []).append((e, ask))
        for room, ok in asks.items():
            outs = generate_fn([a for _, a in ok], replace(sampling, n=1, max_tokens=room,
                               seed=None if sampling.seed is None else sampling.seed + 7919 * turn + 1))
            self._restart(runner, ok, outs)

    @staticmethod
    def _restart(runner: AgentRunner, ok: list, outs: list[Sample]) -> None:
        prefix, newline = runner.encode(SUMMARY_PREFIX), runner.encode("\n")
        for (e, ask), s in zip(ok, outs):
            if s.status in (Status.ABORTED, Status.FAILED):
                e.finish(s.status, s.finish_reason, s.error)
                continue
            e.restart(e.base, e.turns)  # the work so far is one segment ...
            seg = _Segment(ask)  # ... the summary another (the policy wrote it: trained)
            seg.add(list(s.response_ids), list(s.logprobs), s)
            e.segments.append(seg.to_sample(Status.COMPLETED if s.finish_reason == "stop" else Status.TRUNCATED, s.finish_reason))
            text = [t for t in s.response_ids if t != runner.tok.eos_token_id]
            e.base, e.turns = e.question + prefix + text + newline, []
            e.segment = _Segment(e.stream)
            e.stats["context/summary"] += 1
            e.stats["turns"] += 1


CONTEXT_STRATEGIES.register("summary")(Summary())


@dataclass(frozen=True)
class ParallelFewestSteps(ContextStrategy):
    """`cfg.parallel` candidates per sample, nothing done at the trigger; among the candidates that finished,
    the one with the fewest model turns is kept (the first on ties); when none finished, the first."""

    def width(self, cfg):
        return cfg.parallel

    def select(self, candidates):
        done = [e for e in candidates if e.status is Status.COMPLETED]
        best = min(done, key=lambda e: e.stats["turns"]) if done else candidates[0]
        best.stats["context/parallel_discarded"] += len(candidates) - 1
        return best


CONTEXT_STRATEGIES.register("parallel_fewest_steps")(ParallelFewestSteps())
