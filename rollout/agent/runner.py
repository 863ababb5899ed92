"""The episode runner: drives a batch of tool-use episodes through an engine in lock-step (one engine call per
turn for every live episode), parsing `<tool_call>{"name", "arguments"}</tool_call>` from the model's text.

Deviations and limits:
- A model turn counts as one step; `max_turns` bounds the model turns of an episode, including those
  after a reset (otherwise `discard_all` could loop forever).
- On a tool-result token the sampling mask is the token itself and nothing is trained there.
- The tokens appended after a model turn come from the tokenizer's own chat template (`rollout.chat.continuation`
  on a stand-in conversation: a user turn, an assistant turn with reasoning and the calls, then the results),
  with `cfg.template_args` (e.g. `enable_thinking`): tool results go where the template puts them (Qwen3: one
  user turn of `<tool_response>` blocks). This assumes the template renders a tool result independently of
  the earlier turns' text, and that the model's turn ends with `tokenizer.eos_token` as the template writes it.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

from rollout.agent.context import CONTEXT_STRATEGIES
from rollout.agent.episode import SUMMARY_REQUEST, Episode, EpisodeConfig
from rollout.agent.tools import call_tool
from rollout.chat import continuation
from rollout.engine import GenerationStats, Generator, Groups
from rollout.sample import Sample, Status

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class AgentRunner:
    """Tool-use episodes on any `rollout.engine.Generator` (an engine, a RolloutManager, a ScriptedPolicy);
    `on(generator)` is the episodes as a Generator themselves."""

    def __init__(self, tokenizer, cfg: EpisodeConfig, domains: tuple[str, ...] = ()):
        self.strategy = CONTEXT_STRATEGIES.get(cfg.strategy)
        self.tok, self.cfg, self.domains = tokenizer, cfg, tuple(domains)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _turn(self, n_calls: int, reasoning: str | None = "?") -> list[dict]:
        """A stand-in conversation ending in a model turn with `n_calls` tool calls (its text is cut off: only
        what the template appends after it is used). With reasoning, Qwen3-style templates (an empty think
        block on a last assistant turn without it) stay append-only when the tool results follow."""
        call = {"type": "function", "function": {"name": "tool", "arguments": {}}}
        turn = {"role": "assistant", "content": "", "tool_calls": [call] * n_calls}
        return [{"role": "user", "content": "?"}, turn | ({"reasoning_content": reasoning} if reasoning else {})]

    def tool_tokens(self, results: list[str]) -> list[int]:
        """Tool results as the chat template renders them after the model's turn (which ended with its stop
        token), then the next generation prompt."""
        tools = [{"role": "tool", "content": r} for r in results]
        return self.encode(continuation(self.tok, self._turn(len(results)), tools, self.cfg.template_args))

    def summary_ask(self, stream: list[int]) -> list[int]:
        """`stream` (ending with tool results and the generation prompt) with the generation prompt replaced by
        the `SUMMARY_REQUEST` user turn and a new generation prompt, as the chat template renders them.

        The request is a new user message, after which the retention rule (and Qwen3's template) would drop
        the earlier turns' reasoning; the stream's tokens are kept as they are instead (the summary is of
        that work, and the stream is never re-rendered), so the stand-in turn has no reasoning to drop."""
        convo, args = self._turn(1, reasoning=None) + [{"role": "tool", "content": "?"}], self.cfg.template_args
        header = self.encode(continuation(self.tok, convo, [], args))
        if stream[len(stream) - len(header):] != header:
            raise ValueError(f"the episode's context does not end with the generation prompt {self.tok.decode(header)!r}")
        request = continuation(self.tok, convo, [{"role": "user", "content": SUMMARY_REQUEST}], args)
        return stream[: len(stream) - len(header)] + self.encode(request)

    def on(self, generator: Generator) -> Generator:
        """Episodes on `generator`, behind the Generator interface (what `rl.pipeline.generate` calls)."""
        return _Episodes(self, generator)

    def run(self, generator: Generator, prompts: list[list[int]], sampling, stats: GenerationStats | None = None) -> Groups:
        """n = sampling.n episodes per prompt, grouped by prompt; each Sample has `segments` and `tool_stats` set."""
        n, cfg = sampling.n, self.cfg
        width = self.strategy.width(cfg)
        group = n * width

        def generate_fn(streams: list[list[int]], sp) -> list[Sample]:  # one sample per stream and per n, in order
            return [s for g in generator.generate(streams, sp, stats) for s in g]

        eps = [Episode(list(p), list(p)) for p in prompts for _ in range(group)]
        for turn in itertools.count():
            if turn > 0:
                full = [e for e in eps if not e.done and e.turns and len(e.stream) >= cfg.trigger * cfg.max_context]
                self.strategy.manage(self, generate_fn, full, sampling, turn)
            # Turn 0 is one request per prompt with n = group size (a group's samples differ even under a
            # fixed seed); later turns are one request per live episode.
            units = ([(range(u * group, (u + 1) * group), p) for u, p in enumerate(prompts)] if turn == 0
                     else [([i], e.stream) for i, e in enumerate(eps) if not e.done])
            if not units:
                break
            by_room: dict[int, list] = {}
            for members, stream in units:
                room = min(sampling.max_tokens, cfg.max_context - len(stream))
                if room > 0:
                    by_room.setdefault(room, []).append((members, stream))
                for i in members if room <= 0 else ():
                    eps[i].finish(Status.TRUNCATED, "context")
            seed = None if sampling.seed is None else sampling.seed + 7919 * turn
            for room, batch in by_room.items():
                sp = replace(sampling, max_tokens=room, **({"n": group} if turn == 0 else {"n": 1, "seed": seed}))
                outs = generate_fn([stream for _, stream in batch], sp)
                for e, s in zip([eps[i] for members, _ in batch for i in members], outs):
                    self._step(e, s)
        kept = [self.strategy.select(eps[i : i + width]).to_sample() for i in range(0, len(eps), width)]
        return [kept[u * n : (u + 1) * n] for u in range(len(prompts))]

    def _step(self, e: Episode, s: Sample) -> None:
        """Append one model turn; run its tool calls, or finish the episode."""
        if s.status is Status.ABORTED or s.status is Status.FAILED:
            e.finish(s.status, s.finish_reason, s.error)
            return
        e.segment.add(list(s.response_ids), list(s.logprobs), s)
        e.stats["turns"] += 1
        calls = _CALL.findall(self.tok.decode(s.response_ids, skip_special_tokens=True))
        if s.finish_reason != "stop":
            e.finish(Status.TRUNCATED, s.finish_reason)
        elif not calls:
            e.finish(Status.COMPLETED, "stop")
        elif e.stats["turns"] >= self.cfg.max_turns:
            e.finish(Status.TRUNCATED, "max_turns")
        else:
            results = [call_tool(c, self.cfg.tool_context) for c in calls]
            e.stats["tool_calls"] += len(calls)
            e.stats["tool_errors"] += sum(r.startswith("error") for r in results)
            tool = self.tool_tokens(results)
            e.segment.add(tool)
            e.turns.append(list(s.response_ids) + tool)


@dataclass(frozen=True)
class _Episodes:
    runner: AgentRunner
    generator: Generator

    def generate(self, prompts, sampling, stats: GenerationStats | None = None) -> Groups:
        return self.runner.run(self.generator, prompts, sampling, stats)


def run_episode(engine: Generator, tokenizer, prompt_ids: list[int], sampling, context: dict | None = None,
                max_turns: int = 4) -> Sample:
    """One episode on `engine` (any Generator)."""
    runner = AgentRunner(tokenizer, EpisodeConfig(max_turns=max_turns, max_context=10**9, tool_context=context or {}))
    return runner.run(engine, [prompt_ids], replace(sampling, n=1))[0][0]
