"""Thinking in tool use (V3.2 section 3.2.1), first slice: tools, the retention rule, token-level episodes.

- Tools are Python callables registered by name with a JSON schema (`TOOLS`); built-ins: `python`
  (the rewards sandbox), `search` (BM25 over a directory of text files the user provides), `read_file`
  (inside that directory). A failing or timed-out tool returns an error text to the model, never raises.
- Retention rule: reasoning is kept across tool calls and tool results and dropped only when a new user
  message arrives; tool calls and results are always kept. `render_history` applies it to a message list.
  Within one user turn the token stream is append-only, so an episode is built by appending tokens:
  the model's output (trained, loss_mask 1) and the tool results (not trained, loss_mask 0), never by
  re-tokenising earlier text. A new user message starts a new training segment (`split_segments`).
- `run_episode` drives one user turn through an engine (`generate(prompts, sampling)`), parsing
  `<tool_call>{"name", "arguments"}</tool_call>` from the model's text.

Not covered yet (issue #9): context management (summary / discard), the parallel-fewest-steps baseline,
agentic task synthesis, and the end-to-end training example.
"""
from __future__ import annotations

import json
import math
import re
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rewards.registry import Registry

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
def python_tool(code: str, timeout_s: float = 5.0) -> str:
    """Runs in the rewards sandbox; returns stdout (and the error tail on failure)."""
    from rewards.sandbox import SandboxLimits, run_python

    res = run_python(code, SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s))))
    if res.timed_out or res.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # wall or CPU limit
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


@dataclass
class Episode:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 1: the model's tokens, 0: tool results
    logprobs: list[float] = field(default_factory=list)  # the engine's, 0 on tool tokens
    tool_calls: int = 0
    tool_errors: int = 0
    finished: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def run_episode(engine, tokenizer, prompt_ids: list[int], sampling, context: dict | None = None,
                max_turns: int = 4) -> Episode:
    """One user turn: generate, run the tool calls in the output, append their results, continue.

    The engine always receives the episode's exact token stream so far (append-only): the tokens trained
    are the tokens the engine saw."""
    ep = Episode(list(prompt_ids))
    for _ in range(max_turns):
        s = engine.generate([ep.tokens], sampling)[0]
        ep.response_ids += s.response_ids
        ep.loss_mask += [1] * len(s.response_ids)
        ep.logprobs += s.logprobs
        calls = _CALL.findall(tokenizer.decode(s.response_ids, skip_special_tokens=True))
        if not calls or s.finish_reason != "stop":
            ep.finished = s.finish_reason == "stop"
            return ep
        results = [call_tool(c, context or {}) for c in calls]
        ep.tool_calls += len(calls)
        ep.tool_errors += sum(r.startswith("error") for r in results)
        # The model's turn ended with <|im_end|>; continue exactly as the chat template renders the history.
        text = "\n" + "".join(f"<|im_start|>tool\n<tool_response>\n{r}\n</tool_response><|im_end|>\n" for r in results)
        appended = list(tokenizer(text + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        ep.response_ids += appended
        ep.loss_mask += [0] * len(appended)
        ep.logprobs += [0.0] * len(appended)
    return ep
