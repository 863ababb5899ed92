"""Prompt data: loading (anything `datasets.load_dataset` loads), column mapping, row validation with
file:row errors, tokenisation with the chat template (`Dataset.map`, cached by datasets), and a
resumable, deterministic prompt stream.

A row has `prompt` (a string, or a list of chat messages) and `domain` (a key of `rewards:`); the other
fields are the scorers' row fields (`answer`, `tests`, `language`, `rubric`, ...). A dataset whose columns
have other names is mapped with `data.prompt_key`, `data.answer_key` or `data.columns`; rows without a
domain get `data.domain`. Rows are checked for the fields their domain's scorers need and for prompts that
do not fit the context; a bad row stops the run with `file:row: reason`, or is skipped and counted (one
line on stderr) when `data.skip_bad_rows=true`.

Sources (`data.train`, `data.eval`): a JSONL / JSON / Parquet / CSV file or a glob of them, a directory
saved with `Dataset.save_to_disk`, or whatever else `datasets.load_dataset` accepts: a hub dataset name or
a local folder of data files, with `data.split` / `data.eval_split` and `data.subset`. The split applies
to names and folders; a single file is its own (train) split. `row` in `file:row` counts data rows from
1 (for JSONL without blank lines, the line number).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import inspect
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Row fields a scorer cannot work without.
REQUIRED_FIELDS = {"math": ("answer",), "exact": ("answer",), "code": ("tests",), "rubric": ("rubric",), "verifier": ("verifier",)}
# Builders of `datasets.load_dataset` by file suffix.
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_IDS, _PROBLEM = "_v32rl_prompt_ids", "_v32rl_problem"  # columns the tokenising map adds


class DataError(ValueError):
    """A malformed data row or file; the message starts with file:row (or the source and its config key)."""


@dataclass
class Prompt:
    row: dict  # the data row (the scorers' row fields)
    prompt_ids: list[int]
    source: str  # file:row, for messages and for the consumed-prompts record


def load_source(source: str, split: str = "train", subset: str | None = None, key: str = "data.train"):
    """The `datasets.Dataset` behind a `data.train` / `data.eval` value (see the module docstring).

    Errors name the source (a file) or the config key (a name `load_dataset` could not load)."""
    import datasets

    p = Path(source).expanduser()
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source}: no split {split!r} in the saved dataset (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    files = sorted(glob.glob(str(p))) if glob.has_magic(source) else [str(p)] if p.is_file() else []
    if files or p.suffix in FILE_BUILDERS or (source.startswith(("/", "./", "../", "~")) and not p.is_dir()):
        return _load_files(source, files)
    try:
        return datasets.load_dataset(source, subset, split=split)
    except Exception as exc:  # noqa: BLE001  hub, network and builder errors all mean "cannot load this"
        raise DataError(f"{key}={source!r}: datasets.load_dataset cannot load it (split={split!r}, subset={subset!r}): "
                        f"{type(exc).__name__}: {exc}") from None


def _load_files(source: str, files: list[str]):
    import datasets

    if not files:
        raise DataError(f"{source}: " + ("no file matches" if glob.has_magic(source) else "data file does not exist"))
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1 or not suffixes <= set(FILE_BUILDERS):
        raise DataError(f"{source}: unsupported data format {sorted(suffixes)} (use one of .jsonl, .json, .parquet, "
                        ".csv, a saved dataset dir or a dataset name)")
    for f in files:
        # datasets' own errors say neither which file is empty (a StopIteration) nor which line is broken
        if Path(f).stat().st_size == 0 or (f.endswith(".jsonl") and _check_json_lines(Path(f)) == 0):
            raise DataError(f"{f}: the data file is empty")
    try:
        return datasets.load_dataset(FILE_BUILDERS[suffixes.pop()], data_files=files, split="train")
    except Exception as exc:  # noqa: BLE001  whatever the builder says, say which source it was about
        raise DataError(f"{source}: datasets cannot read it ({type(exc).__name__}: {exc})") from exc


def map_columns(ds, source: str, prompt_key: str = "prompt", answer_key: str | None = None,
                columns: dict | None = None, domain: str | None = None):
    """Rename a dataset's columns to row fields (`columns` maps source column -> field, as
    `Dataset.rename_columns`; `prompt_key` / `answer_key` are shorthands for the two common ones) and
    give rows without a domain `domain`."""
    renames = dict(columns or {})
    if prompt_key != "prompt":
        renames[prompt_key] = "prompt"
    if answer_key and answer_key != "answer":
        renames[answer_key] = "answer"
    for col, fld in renames.items():
        if col not in ds.column_names:
            raise DataError(f"{source}: no column {col!r} to use as {fld!r} (columns: {ds.column_names})")
    clash = [fld for col, fld in renames.items() if fld in ds.column_names and fld not in renames]
    if clash:
        raise DataError(f"{source}: column {clash[0]!r} exists already; map it to another name as well")
    if renames:
        ds = ds.rename_columns(renames)
    if domain is not None:
        if "domain" not in ds.column_names:
            ds = ds.add_column("domain", [domain] * len(ds))
        elif None in ds.unique("domain"):
            ds = ds.map(lambda r: {"domain": domain if r["domain"] is None else r["domain"]}, desc="default domain")
    return ds


def read_rows(path: str) -> list[dict]:
    """Rows of a data source as dicts (no mapping, no validation)."""
    return load_source(path).to_list()


def _check_json_lines(p: Path) -> int:
    """The number of rows; raises at the first line that is not a JSON object."""
    rows = 0
    with open(p) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}:{i}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{i}: a row must be a JSON object")
                rows += 1
    return rows


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


def encode_prompt(tokenizer, row: dict, system_prompt: str | None = None, template_args: dict | None = None) -> list[int]:
    """The row's prompt through the chat template with `template_args` (`agent.template_args`, e.g.
    `enable_thinking`); a row's `tools` (names in `rollout.agent.TOOLS`) are listed in the system turn as the
    template renders them."""
    from rollout.agent import TOOLS
    from rollout.chat import encode_chat

    msgs = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else list(row["prompt"])
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    tools = [TOOLS.get(t).spec() for t in row["tools"]] if row.get("tools") else None
    return encode_chat(tokenizer, msgs, tools=tools, **(template_args or {}))


def load_prompts(path: str, tokenizer, specs: dict, max_prompt_tokens: int, skip_bad_rows: bool,
                 system_prompt: str | None = None, *, data_cfg=None, which: str = "train",
                 template_args: dict | None = None) -> tuple[list[Prompt], list[str]]:
    """Validated, tokenised prompts of `path` and the skipped rows' reasons (empty unless skipping).

    `data_cfg` (an `rl.config.DataConfig`) brings the split, subset, column mapping, default domain and
    `num_proc`; `which` ('train' | 'eval') picks `data.split` or `data.eval_split` and the key named in
    errors; `template_args` go to the chat template. Tokenisation is a `Dataset.map`, so a second run on the
    same data and tokenizer reads datasets' cache instead of tokenising again."""
    d = data_cfg
    split = (d.split if which == "train" else d.eval_split) if d is not None else "train"
    ds = load_source(path, split, d.subset if d else None, key=f"data.{which}")
    if d is not None:
        ds = map_columns(ds, path, d.prompt_key, d.answer_key, d.columns, d.domain)
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    import datasets

    # Explicit types: a shard with only bad rows would otherwise infer null columns that do not concatenate.
    features = datasets.Features({**ds.features, _IDS: datasets.Sequence(datasets.Value("int32")),
                                  _PROBLEM: datasets.Value("string")})
    ds = ds.map(_check_and_encode, num_proc=(d.num_proc if d else None), desc="tokenising prompts", features=features,
                fn_kwargs={"tokenizer": tokenizer, "specs": specs, "max_prompt_tokens": max_prompt_tokens,
                           "system_prompt": system_prompt, "template_args": dict(template_args or {}),
                           "code": _encoding_code()})
    prompts, skipped = [], []
    for i, row in enumerate(ds, 1):
        ids, problem = row.pop(_IDS), row.pop(_PROBLEM)
        where = f"{path}:{i}"
        if problem is not None:
            if not skip_bad_rows:
                raise DataError(f"{where}: {problem}")
            skipped.append(f"{where}: {problem}")
            continue
        prompts.append(Prompt(row, ids, where))
    if skipped:
        first = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        print(f"data: skipped {len(skipped)} of {len(ds)} rows of {path} (data.skip_bad_rows=true): {first}", file=sys.stderr)
    if not prompts:
        raise DataError(f"{path}: no usable rows")
    return prompts, skipped


def _check_and_encode(row: dict, tokenizer, specs: dict, max_prompt_tokens: int, system_prompt: str | None,
                      template_args: dict | None = None, code: str = "") -> dict:
    """The map function: the row's token ids, or why it cannot be used. (`code` only keys the cache.)"""
    problem, ids = row_problem(row, specs), []
    if problem is None:
        try:
            ids = encode_prompt(tokenizer, row, system_prompt, template_args)
        except Exception as exc:  # noqa: BLE001  a template that rejects the row is the row's problem
            problem = f"the chat template cannot render the prompt ({type(exc).__name__}: {exc})"
        else:
            if len(ids) > max_prompt_tokens:
                problem = f"prompt has {len(ids)} tokens, more than the {max_prompt_tokens} that fit the context"
    return {_IDS: ids if problem is None else [], _PROBLEM: problem}


@functools.cache
def _encoding_code() -> str:
    """A digest of the modules that turn rows into ids (this one, the chat encoding, the tools' specs).
    datasets keys its cache on the map function's arguments and on module functions by name only (measured:
    a changed body hashes the same), so without this an upgraded encoder would read ids the old one cached."""
    from rollout import chat
    from rollout.agent import tools

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], chat, tools):
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):  # no source shipped: the version string is all there is
            digest.update(module.__name__.encode())
    return digest.hexdigest()


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
