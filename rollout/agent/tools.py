"""Tools: Python callables registered by name with a JSON schema (`TOOLS`).

Built-ins: `python` (the rewards sandbox), `search` (BM25 over a directory of text files the user provides),
`read_file` (inside that directory). A failing or timed-out tool returns an error text to the model, never
raises.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rewards.registry import Registry

TOOLS: Registry = Registry("tool")


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
    hits = [f"{p.relative_to(root)}: {p.read_text(errors='replace').splitlines()[0][:200]}" for p in best if scores[p] > 0]
    return "\n".join(hits) or "no match"


@register_tool("read_file", {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})
def read_file_tool(path: str, root: str) -> str:
    target = (Path(root) / path).resolve()
    if not str(target).startswith(str(Path(root).resolve()) + "/"):
        return "error: path outside the document root"
    return target.read_text(errors="replace")[:4000]
