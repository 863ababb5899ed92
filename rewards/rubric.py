"""Rubric-based generative reward model (GenRM): a judge model grades a completion against the prompt's rubric.

The judge is any OpenAI-compatible chat endpoint (a vLLM server in production: `vllm serve JUDGE`).
Its reply is parsed into a score in [0, 1]: "Score: 7/10", "Score: 0.7", "[[7]]". A reply that does not
parse, or a failed request, gives None (the sample abstains) and is counted as `rubric:parse_failure` /
`rubric:request_error`: never silently 0.

`guided=True` asks a vLLM server to constrain the reply to the score format (vLLM's `structured_outputs`
regex), so even a weak judge returns a parseable score; other servers ignore or reject the field.

Deviation: V3.2 uses its own GenRM with per-prompt rubrics and does not publish the judge prompt; this one
is ours. Only the final answer (after `</think>`) is judged, as the reasoning is not shown to users.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request

from rewards.base import column, record_event, register_scorer, split_thinking

JUDGE_PROMPT = """You are grading a response against a rubric.

# Question
{prompt}

# Rubric
{rubric}

# Response
{response}

Grade how well the response satisfies the rubric. Reply with one line: "Score: N/{max_score}" where N is an integer from 0 to {max_score}."""

_SCORE_PATTERNS = [
    re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.I),
    re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]"),
]


def parse_judge_score(text: str, max_score: float = 10.0) -> float | None:
    """A score in [0, 1] from the judge's reply, or None when there is none (or it is out of range).

    "N/D" uses D as the scale; a bare N uses `max_score`, except values in [0, 1] with a decimal point,
    which are taken as already normalised."""
    for pat in _SCORE_PATTERNS:
        m = pat.search(text)
        if not m:
            continue
        value = float(m.group(1))
        scale = float(m.group(2)) if m.lastindex and m.lastindex >= 2 and m.group(2) else None
        if scale is None:
            scale = 1.0 if ("." in m.group(1) and 0.0 <= value <= 1.0) else max_score
        if scale <= 0 or not 0.0 <= value <= scale:
            return None
        return value / scale
    return None


def _chat(base_url: str, payload: dict, api_key: str | None, timeout_s: float) -> str:
    req = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"] or ""


@register_scorer("rubric")
def rubric_scorer(
    completions: list[str],
    rubric: list,
    prompt: list | None = None,
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str = "JUDGE_API_KEY",
    max_score: int = 10,
    max_tokens: int = 32,
    temperature: float = 0.0,
    timeout_s: float = 60.0,
    guided: bool = False,
    **_,
) -> list[float | None]:
    """Judge each completion against its row's `rubric` (see module docstring). `base_url` (e.g.
    http://127.0.0.1:8000/v1) and `model` come from the spec's args or JUDGE_BASE_URL / JUDGE_MODEL."""
    base_url = base_url or os.environ.get("JUDGE_BASE_URL")
    model = model or os.environ.get("JUDGE_MODEL")
    if not base_url or not model:
        raise ValueError("rubric scorer: set args.base_url and args.model (or JUDGE_BASE_URL / JUDGE_MODEL)")
    api_key = os.environ.get(api_key_env)
    prompts = column({"p": prompt}, "p", len(completions), "")
    out: list[float | None] = []
    for text, rub, q in zip(completions, rubric, prompts):
        _, answer = split_thinking(text)
        content = JUDGE_PROMPT.format(prompt=q or "", rubric=rub, response=answer, max_score=max_score)
        payload = {"model": model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": max_tokens, "temperature": temperature}
        if guided:
            scores = "|".join(str(i) for i in range(max_score, -1, -1))  # longest first: "10" before "1"
            payload["structured_outputs"] = {"regex": f"Score: ({scores})/{max_score}"}
        try:
            reply = _chat(base_url, payload, api_key, timeout_s)
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError):
            record_event("rubric", "request_error")
            out.append(None)
            continue
        score = parse_judge_score(reply, max_score)
        if score is None:
            record_event("rubric", "parse_failure")
        out.append(score)
    return out
