"""Episode state: the retention rule, the token-level episode and its training segments.

Retention rule: reasoning is kept across tool calls and tool results and dropped only when a new user
message arrives; tool calls and results are always kept. `render_history` applies it to a message list.
Within one user turn the token stream is append-only, so an episode is built by appending tokens: the
model's output (trained, loss_mask 1) and the tool results (not trained, loss_mask 0), never by
re-tokenising earlier text. A new user message starts a new training segment (`split_segments`); so does
each firing of context management (`Episode.restart`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from rollout.sample import KeptSets, Sample, Status


def render_history(messages: list[dict]) -> list[dict]:
    """The retention rule on a message list: drop `reasoning_content` of assistant messages that come before
    the last user message; keep everything else (tool calls and results included)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [{k: v for k, v in m.items() if not (k == "reasoning_content" and i < last_user)} for i, m in enumerate(messages)]


def split_segments(messages: list[dict]) -> list[list[dict]]:
    """Training segments: each starts at a user message and runs to the next one (the context before it,
    rendered under the retention rule, is its prompt)."""
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"] + [len(messages)]
    return [messages[: b] for a, b in zip(starts, starts[1:])]


@dataclass(frozen=True)
class EpisodeConfig:
    max_turns: int = 4  # model turns per episode (all segments together)
    max_context: int = 1024  # the context budget in tokens (<= the engine's max_model_len)
    trigger: float = 0.8  # context management fires at this fraction of max_context
    strategy: str = "none"  # a CONTEXT_STRATEGIES name
    parallel: int = 4  # parallel_fewest_steps: candidates per episode
    summary_tokens: int = 64  # summary: the budget of the summary turn
    tool_context: dict = field(default_factory=dict)  # tool name -> fixed keyword arguments (root, timeout_s)
    template_args: dict = field(default_factory=dict)  # chat-template keyword arguments, e.g. {enable_thinking: False}


SUMMARY_REQUEST = ("The context is nearly full. Summarise the work so far: the facts found and what remains to do. "
                   "Do not call tools.")  # a user message, rendered by the chat template
SUMMARY_PREFIX = "Summary of my work so far: "


@dataclass
class _Segment:
    """The training segment being built: a fixed context and the tokens appended to it."""

    context: list[int]
    response: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    kept: list[KeptSets] | None = None  # per engine call (+ tool tokens), when the engine returns sampling masks
    routed: np.ndarray | None = None  # [positions run so far, layers, k], when the engine returns routing
    version: int | None = None

    def add(self, ids: list[int], logprobs: list[float] | None = None, sample: Sample | None = None) -> None:
        trained = logprobs is not None
        self.response += ids
        self.loss_mask += [int(trained)] * len(ids)
        self.logprobs += logprobs if trained else [0.0] * len(ids)
        if sample is not None and sample.kept is not None:
            self.kept = (self.kept or []) + [sample.kept.take(len(ids))]
        elif self.kept is not None:  # tool tokens: nothing sampled, nothing trained
            self.kept.append(KeptSets.from_lists([[t] for t in ids], self.kept[0].vocab_size))
        if sample is not None:
            self.version = sample.policy_version if self.version is None else min(self.version, sample.policy_version)
            if sample.routed_experts is not None:  # keep rows already recorded; take the new positions
                have = 0 if self.routed is None else len(self.routed)
                new = sample.routed_experts[have:]
                self.routed = new if self.routed is None else np.concatenate([self.routed, new])

    def to_sample(self, status: Status, finish_reason: str | None) -> Sample:
        """Ends at the last trained token: trailing tool results train nothing and the engine never ran
        them in this segment, so they have no routing to replay."""
        last = max((i for i, m in enumerate(self.loss_mask) if m), default=-1) + 1
        s = Sample(prompt_ids=list(self.context), response_ids=self.response[:last], logprobs=self.logprobs[:last],
                   loss_mask=self.loss_mask[:last], status=status, finish_reason=finish_reason,
                   policy_version=self.version or 0)
        if self.kept is not None:
            s.kept = KeptSets.concat(self.kept).take(last)
        if self.routed is not None:
            s.routed_experts = self.routed[: len(self.context) + last - 1]
        return s


@dataclass
class Episode:
    """One tool-use episode. The live stream is `base + concat(turns)`; a turn is a model output with a
    tool call plus the tool results appended after it (what `discard_*` drops)."""

    question: list[int]
    base: list[int]
    turns: list[list[int]] = field(default_factory=list)
    segment: _Segment | None = None
    segments: list[Sample] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    done: bool = False
    status: Status = Status.PENDING
    finish_reason: str | None = None
    error: str | None = None

    def __post_init__(self):
        self.segment = self.segment or _Segment(list(self.base))

    @property
    def stream(self) -> list[int]:
        return self.base + [t for turn in self.turns for t in turn]

    def restart(self, base: list[int], turns: list[list[int]]) -> None:
        """Close the current segment (if it trained anything) and continue from a managed context."""
        if any(self.segment.loss_mask):
            self.segments.append(self.segment.to_sample(Status.TRUNCATED, "context"))
        self.base, self.turns = base, turns
        self.segment = _Segment(self.stream)

    def finish(self, status: Status, reason: str | None, error: str | None = None) -> None:
        self.done, self.status, self.finish_reason, self.error = True, status, reason, error

    def to_sample(self) -> Sample:
        s = self.segment.to_sample(self.status, self.finish_reason)
        s.error, s.segments = self.error, self.segments
        s.tool_stats = {"segments": len(self.segments) + 1, **self.stats}
        return s


def final_turn_ids(s: Sample) -> list[int]:
    """The model's last turn: the tokens after the last tool result (what the answer scorers read)."""
    last_tool = max((i for i, m in enumerate(s.loss_mask) if not m), default=-1)
    return s.response_ids[last_tool + 1 :]
