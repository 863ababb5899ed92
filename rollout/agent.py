"""Thinking in tool use (V3.2 section 3.2.1): tools, the retention rule, token-level episodes, context
management.

- Tools are Python callables registered by name with a JSON schema (`TOOLS`); built-ins: `python`
  (the rewards sandbox), `search` (BM25 over a directory of text files the user provides), `read_file`
  (inside that directory). A failing or timed-out tool returns an error text to the model, never raises.
- Retention rule: reasoning is kept across tool calls and tool results and dropped only when a new user
  message arrives; tool calls and results are always kept. `render_history` applies it to a message list.
  Within one user turn the token stream is append-only, so an episode is built by appending tokens:
  the model's output (trained, loss_mask 1) and the tool results (not trained, loss_mask 0), never by
  re-tokenising earlier text. A new user message starts a new training segment (`split_segments`).
- `run_episodes` drives a batch of episodes through an engine in lock-step (one engine call per turn for
  every live episode), parsing `<tool_call>{"name", "arguments"}</tool_call>` from the model's text.
- Context management (section 4.4) fires when an episode's context reaches `trigger` (80%) of
  `max_context` tokens: `summary`, `discard_75`, `discard_all` (`CONTEXT_STRATEGIES`), or the
  `parallel_fewest_steps` baseline. Each firing is counted in the episode's `tool_stats`.

Deviations and limits:
- The paper uses context management at test time (BrowseComp); here it also runs in training rollouts.
  A managed context is no longer a prefix of what came before, so each firing closes a training segment:
  an episode yields several `Sample`s (the last one carries the reward; `Sample.segments` holds the earlier
  ones, which share its advantage). The summary the model writes is trained too (its own segment).
- `summary` asks the policy itself (no separate summariser) and restarts from the question with the
  summary as the beginning of the assistant's turn (the summary's tokens are reused, not re-tokenised).
- A model turn counts as one step; `max_turns` bounds the model turns of an episode, including those
  after a reset (otherwise `discard_all` could loop forever).
- On a tool-result token the sampling mask is the token itself and nothing is trained there.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from rewards.registry import Registry
from rollout.sample import KeptSets, Sample, Status

TOOLS: Registry = Registry("tool")
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., str]
    schema: dict  # JSON schema of the arguments (shown to the model in the chat template's tools list)

    def spec(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "parameters": self.schema}}


def register_tool(name: str, schema: dict):
    def deco(fn):
        TOOLS.register(name)(Tool(name, fn, schema))
        return fn

    return deco


def call_tool(text: str, context: dict) -> str:
    """Run one `<tool_call>` body; every failure becomes an error message for the model."""
    try:
        call = json.loads(text)
        tool = TOOLS.get(call["name"])
        return str(tool.fn(**call.get("arguments", {}), **context.get(tool.name, {})))
    except Exception as exc:  # noqa: BLE001  the model sees the error and may retry
        return f"error: {type(exc).__name__}: {exc}"


@register_tool("python", {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]})
def python_tool(code: str, timeout_s: float = 5.0, sandbox: str = "local", sandbox_url: str | None = None,
                allow_weak_sandbox: bool = False) -> str:
    """Runs in the rewards sandbox (`rewards.sandbox`; the options as for the `code` scorer); returns stdout
    (and the error tail on failure)."""
    from rewards.sandbox import SandboxLimits, backend_from_options, run_python

    res = run_python(code, SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s))),
                     backend=backend_from_options(sandbox, sandbox_url, allow_weak_sandbox))
    if res.limit_hit:
        return "error: timed out"
    return res.stdout[-2000:].rstrip("\n") if res.ok else f"error (exit {res.returncode}): {res.stderr[-1000:]}"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@register_tool("search", {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
def search_tool(query: str, root: str, k: int = 3) -> str:
    """BM25 (k1=1.5, b=0.75) over the text files under `root`; returns the top-k file names and first lines."""
    docs = {p: _words(p.read_text(errors="replace")) for p in sorted(Path(root).rglob("*.txt"))}
    if not docs:
        return "error: no documents"
    avg = sum(len(d) for d in docs.values()) / len(docs)
    df = Counter(w for d in docs.values() for w in set(d))
    scores = {}
    for p, d in docs.items():
        tf = Counter(d)
        scores[p] = sum(math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5)) * tf[w] * 2.5
                        / (tf[w] + 1.5 * (0.25 + 0.75 * len(d) / avg)) for w in _words(query) if w in tf)
    best = sorted(scores, key=lambda p: -scores[p])[:k]
    return "\n".join(f"{p.relative_to(root)}: {p.read_text(errors='replace').splitlines()[0][:200]}" for p in best if scores[p] > 0) or "no match"


@register_tool("read_file", {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})
def read_file_tool(path: str, root: str) -> str:
    target = (Path(root) / path).resolve()
    if not str(target).startswith(str(Path(root).resolve()) + "/"):
        return "error: path outside the document root"
    return target.read_text(errors="replace")[:4000]


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


# ---------------------------------------------------------------------------------------------------------
# Episodes


@dataclass(frozen=True)
class EpisodeConfig:
    max_turns: int = 4  # model turns per episode (all segments together)
    max_context: int = 1024  # the context budget in tokens (<= the engine's max_model_len)
    trigger: float = 0.8  # context management fires at this fraction of max_context
    strategy: str = "none"  # a CONTEXT_STRATEGIES name, "parallel_fewest_steps" or "none"
    parallel: int = 4  # parallel_fewest_steps: candidates per episode
    summary_tokens: int = 64  # summary: the budget of the summary turn
    tool_context: dict = field(default_factory=dict)  # tool name -> fixed keyword arguments (root, timeout_s)


SUMMARY_REQUEST = ("<|im_start|>user\nThe context is nearly full. Summarise the work so far: the facts found and "
                   "what remains to do. Do not call tools.<|im_end|>\n<|im_start|>assistant\n")
SUMMARY_PREFIX = "Summary of my work so far: "
_TOOL_TURN = "<|im_start|>tool\n<tool_response>\n{}\n</tool_response><|im_end|>\n"


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


CONTEXT_STRATEGIES: Registry = Registry("context strategy")


@CONTEXT_STRATEGIES.register("discard_75")
def discard_75(ep: Episode) -> list[list[int]]:
    """Drop the oldest 75% of the tool-call turns (rounded down, at least one), keep the rest."""
    return ep.turns[max(1, int(0.75 * len(ep.turns))) :]


@CONTEXT_STRATEGIES.register("discard_all")
def discard_all(ep: Episode) -> list[list[int]]:
    """Reset to the question (and a summary, if one was written before)."""
    return []


@CONTEXT_STRATEGIES.register("summary")
def summary(ep: Episode) -> list[list[int]]:
    """Marker: the runner asks the model for a summary, then restarts from question + summary."""
    return []


class AgentRunner:
    """Tool-use episodes on any `generate_fn(prompts, SamplingConfig) -> list[Sample]` (an engine's
    `generate`, or a RolloutManager's first return value)."""

    def __init__(self, tokenizer, cfg: EpisodeConfig, domains: tuple[str, ...] = ()):
        if cfg.strategy not in ("none", "parallel_fewest_steps") and cfg.strategy not in CONTEXT_STRATEGIES:
            raise ValueError(f"context strategy {cfg.strategy!r}: supported {['none', 'parallel_fewest_steps'] + CONTEXT_STRATEGIES.names()}")
        self.tok, self.cfg, self.domains = tokenizer, cfg, tuple(domains)
        encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        self._encode = encode
        self._summary_request, self._summary_prefix, self._newline = encode(SUMMARY_REQUEST), encode(SUMMARY_PREFIX), encode("\n")

    def tool_tokens(self, results: list[str]) -> list[int]:
        """Tool results exactly as the chat template renders them, then the next assistant header. The model's
        turn ended with <|im_end|>; the template puts a newline after it."""
        return self._encode("\n" + "".join(_TOOL_TURN.format(r) for r in results) + "<|im_start|>assistant\n")

    def run(self, generate_fn, prompts: list[list[int]], sampling) -> list[Sample]:
        """n = sampling.n episodes per prompt; returns n Samples per prompt, ordered by prompt, with
        `prompt_index`, `segments` and `tool_stats` set."""
        n, cfg = sampling.n, self.cfg
        width = cfg.parallel if cfg.strategy == "parallel_fewest_steps" else 1
        group = n * width
        eps = [Episode(list(p), list(p)) for p in prompts for _ in range(group)]
        for turn in itertools.count():
            if turn > 0:
                self._manage(generate_fn, [e for e in eps if not e.done], sampling, turn)
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
                outs = sorted(generate_fn([stream for _, stream in batch], sp), key=lambda s: s.prompt_index)
                for e, s in zip([eps[i] for members, _ in batch for i in members], outs):
                    self._step(e, s)
        if width > 1:
            eps = [self._fewest_steps(eps[i : i + width]) for i in range(0, len(eps), width)]
        out = []
        for i, e in enumerate(eps):
            s = e.to_sample()
            s.prompt_index = i // n
            for seg in s.segments:
                seg.prompt_index = s.prompt_index
            out.append(s)
        return out

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

    def _manage(self, generate_fn, live: list[Episode], sampling, turn: int) -> None:
        """Context management for the live episodes whose context reached the trigger."""
        cfg = self.cfg
        if cfg.strategy in ("none", "parallel_fewest_steps"):
            return
        full = [e for e in live if e.turns and len(e.stream) >= cfg.trigger * cfg.max_context]
        if cfg.strategy == "summary" and full:
            self._summarise(generate_fn, full, sampling, turn)
            return
        for e in full:
            e.restart(e.base, CONTEXT_STRATEGIES.get(cfg.strategy)(e))
            e.stats[f"context/{cfg.strategy}"] += 1

    def _summarise(self, generate_fn, full: list[Episode], sampling, turn: int) -> None:
        cfg = self.cfg
        asks: dict[int, list] = {}
        for e in full:
            ask = e.stream + self._summary_request
            room = min(cfg.summary_tokens, cfg.max_context - len(ask))
            if room < 8:  # no room left to ask for a summary: the episode ends here
                e.finish(Status.TRUNCATED, "context")
            else:
                asks.setdefault(room, []).append((e, ask))
        for room, ok in asks.items():
            outs = generate_fn([a for _, a in ok], replace(sampling, n=1, max_tokens=room,
                               seed=None if sampling.seed is None else sampling.seed + 7919 * turn + 1))
            outs.sort(key=lambda s: s.prompt_index)
            self._restart_from_summaries(ok, outs)

    def _restart_from_summaries(self, ok: list, outs: list[Sample]) -> None:
        for (e, ask), s in zip(ok, outs):
            if s.status in (Status.ABORTED, Status.FAILED):
                e.finish(s.status, s.finish_reason, s.error)
                continue
            e.restart(e.base, e.turns)  # the work so far is one segment ...
            seg = _Segment(ask)  # ... the summary another (the policy wrote it: trained)
            seg.add(list(s.response_ids), list(s.logprobs), s)
            e.segments.append(seg.to_sample(Status.COMPLETED if s.finish_reason == "stop" else Status.TRUNCATED, s.finish_reason))
            text = [t for t in s.response_ids if t != self.tok.eos_token_id]
            e.base, e.turns = e.question + self._summary_prefix + text + self._newline, []
            e.segment = _Segment(e.stream)
            e.stats["context/summary"] += 1
            e.stats["turns"] += 1

    @staticmethod
    def _fewest_steps(candidates: list[Episode]) -> Episode:
        """The parallel-fewest-steps baseline: among the candidates that finished, the one with the fewest
        model turns (the first on ties); when none finished, the first."""
        done = [e for e in candidates if e.status is Status.COMPLETED]
        best = min(done, key=lambda e: e.stats["turns"]) if done else candidates[0]
        best.stats["context/parallel_discarded"] += len(candidates) - 1
        return best


def final_turn_ids(s: Sample) -> list[int]:
    """The model's last turn: the tokens after the last tool result (what the answer scorers read)."""
    last_tool = max((i for i, m in enumerate(s.loss_mask) if not m), default=-1)
    return s.response_ids[last_tool + 1 :]


def run_episode(engine, tokenizer, prompt_ids: list[int], sampling, context: dict | None = None,
                max_turns: int = 4) -> Sample:
    """One episode on an engine with `generate(prompts, sampling) -> list[Sample]`."""
    runner = AgentRunner(tokenizer, EpisodeConfig(max_turns=max_turns, max_context=10**9, tool_context=context or {}))
    return runner.run(engine.generate, [prompt_ids], replace(sampling, n=1))[0]


class ScriptedPolicy:
    """An engine whose turns are written by `script(prompt_text) -> text` instead of sampled: the oracle
    that produces SFT trajectories from a task's reference solution (`oracle_script`), and a
    deterministic driver for the context-management tests. Same interface as the real engines."""

    def __init__(self, tokenizer, script: Callable[[str], str], logprob: float = -0.1):
        self.tok, self.script, self.logprob, self.prompts = tokenizer, script, logprob, []

    def generate(self, prompts, sampling, prompt_offset: int = 0) -> list[Sample]:
        out = []
        for j, p in enumerate(prompts):
            self.prompts.append(list(p))
            text = self.script(self.tok.decode(p))
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])[: sampling.max_tokens - 1]
            ids.append(self.tok.eos_token_id)
            for _ in range(sampling.n):
                out.append(Sample(prompt_ids=list(p), response_ids=list(ids), logprobs=[self.logprob] * len(ids),
                                  loss_mask=[1] * len(ids), status=Status.COMPLETED, finish_reason="stop",
                                  prompt_index=prompt_offset + j))
        return out


def tool_call_text(name: str, arguments: dict) -> str:
    """A tool call as the chat template writes it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def oracle_script(solutions: dict[str, list[str]]) -> Callable[[str], str]:
    """question text -> the solution's turns; the turn is the number of tool results already in the prompt."""
    def script(prompt_text: str) -> str:
        for question, turns in solutions.items():
            if f"user\n{question}<|im_end|>" in prompt_text:  # the user turn, not a substring of another
                return turns[min(prompt_text.count("<tool_response>"), len(turns) - 1)]
        raise KeyError(f"no scripted solution for prompt ending {prompt_text[-200:]!r}")

    return script
