"""Prompt data: loading (HF `datasets`: JSONL, Parquet or a saved dataset directory), row validation with
file:row errors, tokenisation with the chat template, and a resumable, deterministic prompt stream.

A row has `prompt` (a string, or a list of chat messages) and `domain` (a key of `rewards:`); the other
fields are the scorers' row fields (`answer`, `tests`, `language`, `rubric`, ...). Rows are checked for
the fields their domain's scorers need and for prompts that do not fit the context; a bad row stops the
run with `file:row: reason`, or is skipped and counted when `data.skip_bad_rows=true`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

# Row fields a scorer cannot work without.
REQUIRED_FIELDS = {"math": ("answer",), "exact": ("answer",), "code": ("tests",), "rubric": ("rubric",), "verifier": ("verifier",)}


class DataError(ValueError):
    """A malformed data row or file; the message starts with file:row."""


@dataclass
class Prompt:
    row: dict  # the data row (the scorers' row fields)
    prompt_ids: list[int]
    source: str  # file:row, for messages and for the consumed-prompts record


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL / JSON / Parquet file or a saved `datasets` directory, via HF datasets."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: data file does not exist")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    elif p.suffix in (".jsonl", ".json"):
        _check_json_lines(p)  # datasets' own error does not say which line is broken
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    elif p.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files=str(p), split="train")
    else:
        raise DataError(f"{path}: unsupported data format (use .jsonl, .json, .parquet or a saved dataset dir)")
    return [dict(r) for r in ds]


def _check_json_lines(p: Path) -> None:
    if p.suffix != ".jsonl":
        return
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}:{i}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{i}: a row must be a JSON object")


def row_problem(row: dict, specs: dict) -> str | None:
    """Why a row cannot be used (None when it is fine)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            return "empty prompt"
    elif isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
            return "prompt messages must be a non-empty list of {role, content}"
    else:
        return "missing 'prompt' (a string or a list of chat messages)"
    domain = row.get("domain")
    if domain not in specs:
        return f"domain {domain!r} has no reward spec (rewards: {sorted(specs)})"
    tools = row.get("tools")
    if tools is not None:
        from rollout.agent import TOOLS

        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            return "'tools' must be a list of tool names"
        unknown = [t for t in tools if t not in TOOLS]
        if unknown:
            return f"unknown tool {unknown[0]!r} (registered: {TOOLS.names()})"
    for dim in specs[domain].dimensions:
        for key in REQUIRED_FIELDS.get(dim.scorer, ()):
            if row.get(key) in (None, "", []):
                return f"missing '{key}' needed by the {dim.scorer} scorer of domain {domain!r}"
    return None


def encode_prompt(tokenizer, row: dict, system_prompt: str | None = None) -> list[int]:
    """The row's prompt through the chat template; a row's `tools` (names in `rollout.agent.TOOLS`) are
    listed in the system turn as the template renders them."""
    from rollout.agent import TOOLS
    from rollout.chat import encode_chat

    msgs = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else list(row["prompt"])
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    tools = [TOOLS.get(t).spec() for t in row["tools"]] if row.get("tools") else None
    return encode_chat(tokenizer, msgs, tools=tools)


def load_prompts(path: str, tokenizer, specs: dict, max_prompt_tokens: int, skip_bad_rows: bool,
                 system_prompt: str | None = None) -> tuple[list[Prompt], list[str]]:
    """Validated, tokenised prompts and the list of skipped rows' reasons (empty unless skipping)."""
    prompts, skipped = [], []
    for i, row in enumerate(read_rows(path), 1):
        where = f"{path}:{i}"
        problem = row_problem(row, specs)
        ids = None
        if problem is None:
            ids = encode_prompt(tokenizer, row, system_prompt)
            if len(ids) > max_prompt_tokens:
                problem = f"prompt has {len(ids)} tokens, more than the {max_prompt_tokens} that fit the context"
        if problem is not None:
            if not skip_bad_rows:
                raise DataError(f"{where}: {problem}")
            skipped.append(f"{where}: {problem}")
            continue
        prompts.append(Prompt(row, ids, where))
    if not prompts:
        raise DataError(f"{path}: no usable rows")
    return prompts, skipped


@dataclass
class PromptStream:
    """Epochs of a seeded permutation; `position` is everything needed to resume exactly."""

    prompts: list[Prompt]
    seed: int
    epoch: int = 0
    index: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._reshuffle()

    def _reshuffle(self) -> None:
        self._order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)

    def next(self, k: int) -> list[Prompt]:
        out = []
        while len(out) < k:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._reshuffle()
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict) -> None:
        self.epoch, self.index = position["epoch"], position["index"]
        self._reshuffle()
