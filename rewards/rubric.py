"""Rubric-based generative reward model (GenRM): a judge model grades a completion against the prompt's rubric.

The judge is any OpenAI-compatible chat endpoint (a vLLM server in production: `vllm serve JUDGE`), called
through the `openai` client's async API with at most `max_concurrency` requests in flight (imported when
the scorer runs: it is in the `rewards` extra, and vLLM installs it).
Its reply is parsed into a score in [0, 1]: "Score: 7/10", "Score: 0.7", "[[7]]". A reply that does not
parse, or a failed request, gives None (the sample abstains) and is counted as `rubric:parse_failure` /
`rubric:request_error`: never silently 0.

`guided=True` asks a vLLM server to constrain the reply to the score format (vLLM's `structured_outputs`
regex), so even a weak judge returns a parseable score; other servers ignore or reject the field.

Deviation: V3.2 uses its own GenRM with per-prompt rubrics and does not publish the judge prompt; this one
is ours. Only the final answer (after `</think>`) is judged, as the reasoning is not shown to users.
"""
from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor

from rewards.base import column, record_event, register_scorer, split_thinking

JUDGE_PROMPT = """You are grading a response against a rubric.

# Question
{prompt}

# Rubric
{rubric}

# Response
{response}

Grade how well the response satisfies the rubric. Reply with one line: "Score: N/{max_score}" where N is an integer from 0 to {max_score}."""  # noqa: E501

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


async def _judge_all(payloads: list[dict], base_url: str, api_key: str | None, timeout_s: float, max_retries: int,
                     max_concurrency: int) -> list[str | None]:
    """The judge's reply to each request (None when it failed), at most `max_concurrency` in flight."""
    from openai import AsyncOpenAI, OpenAIError

    # vLLM without --api-key accepts any key; the client refuses to start without one.
    client = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=max_retries)
    slots = asyncio.Semaphore(max_concurrency)

    async def one(payload: dict) -> str | None:
        async with slots:
            try:
                resp = await client.chat.completions.create(**payload)
                return resp.choices[0].message.content or ""
            except (OpenAIError, IndexError, AttributeError):
                return None

    try:
        return await asyncio.gather(*(one(p) for p in payloads))
    finally:
        await client.close()


def _run(coro):
    """asyncio.run, also from a thread of a program that already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


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
    max_retries: int = 2,
    max_concurrency: int = 8,
    guided: bool = False,
    **_,
) -> list[float | None]:
    """Judge each completion against its row's `rubric` (see module docstring). `base_url` (e.g.
    http://127.0.0.1:8000/v1) and `model` come from the spec's args or JUDGE_BASE_URL / JUDGE_MODEL.
    Requests go out concurrently through the `openai` client's async API, at most `max_concurrency` at a
    time (a spec arg: `rubric: {scorer: rubric, args: {max_concurrency: 32}}`); `timeout_s` and `max_retries`
    are per request. The scoring pool's time-out still bounds the whole batch: raise it with the judge's."""
    base_url = base_url or os.environ.get("JUDGE_BASE_URL")
    model = model or os.environ.get("JUDGE_MODEL")
    if not base_url or not model:
        raise ValueError("rubric scorer: set args.base_url and args.model (or JUDGE_BASE_URL / JUDGE_MODEL)")
    if max_concurrency < 1:
        raise ValueError(f"rubric scorer: args.max_concurrency must be >= 1, got {max_concurrency}")
    try:
        import openai  # noqa: F401  (optional: the `rewards` extra)
    except ImportError:
        raise ImportError("rubric scorer: needs the openai client (pip install openai, or the v32rl[rewards] extra)") from None
    prompts = column({"p": prompt}, "p", len(completions), "")
    payloads = []
    for text, rub, q in zip(completions, rubric, prompts):
        _, answer = split_thinking(text)
        content = JUDGE_PROMPT.format(prompt=q or "", rubric=rub, response=answer, max_score=max_score)
        payload = {"model": model, "messages": [{"role": "user", "content": content}],
                   "max_tokens": max_tokens, "temperature": temperature}
        if guided:
            scores = "|".join(str(i) for i in range(max_score, -1, -1))  # longest first: "10" before "1"
            payload["extra_body"] = {"structured_outputs": {"regex": f"Score: ({scores})/{max_score}"}}
        payloads.append(payload)
    replies = _run(_judge_all(payloads, base_url, os.environ.get(api_key_env), timeout_s, max_retries, max_concurrency))
    out: list[float | None] = []
    for reply in replies:
        if reply is None:
            record_event("rubric", "request_error")
            out.append(None)
            continue
        score = parse_judge_score(reply, max_score)
        if score is None:
            record_event("rubric", "parse_failure")
        out.append(score)
    return out
