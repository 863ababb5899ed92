"""Data loading: file:row errors, skip-and-count, JSONL/Parquet/saved-dataset inputs, exact stream resume."""
from __future__ import annotations

import json

import pytest

from rewards import parse_specs
from rl.data import DataError, PromptStream, load_prompts, read_rows

SPECS = parse_specs({"math": {"correct": 1.0}, "chat": {"style": {"scorer": "format"}}})


@pytest.fixture(scope="module")
def tok(tiny_dense):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dense)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "What is 1 + 1?", "domain": "math", "answer": "2"}


@pytest.mark.parametrize(
    "bad,reason",
    [
        ('{"prompt": "x", "domain": "math", "answer": 1', "not valid JSON"),
        ({"domain": "math", "answer": "2"}, "missing 'prompt'"),
        ({"prompt": "  ", "domain": "math", "answer": "2"}, "empty prompt"),
        ({"prompt": "x", "domain": "poetry"}, "domain 'poetry' has no reward spec"),
        ({"prompt": "x", "domain": "math"}, "missing 'answer' needed by the math scorer of domain 'math'"),
        ({"prompt": "word " * 300, "domain": "math", "answer": "2"}, "more than the 64 that fit the context"),
        ({"prompt": "x", "domain": "math", "answer": "2", "tools": ["shell"]}, "unknown tool 'shell'"),
    ],
)
def test_bad_row_names_file_and_row(tmp_path, tok, bad, reason):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=rf"d.jsonl:3: .*{reason}"):
        load_prompts(path, tok, SPECS, 64, skip_bad_rows=False)


def test_skip_bad_rows_counts_them(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [GOOD, {"prompt": "x", "domain": "math"}, GOOD, {"domain": "chat"}])
    prompts, skipped = load_prompts(path, tok, SPECS, 64, skip_bad_rows=True)
    assert [p.source.rsplit(":", 1)[1] for p in prompts] == ["1", "3"]
    assert len(skipped) == 2 and skipped[0].endswith("d.jsonl:2: missing 'answer' needed by the math scorer of domain 'math'")


def test_parquet_and_saved_dataset(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list([GOOD, {**GOOD, "answer": "3"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert [r["answer"] for r in read_rows(str(tmp_path / "d.parquet"))] == ["2", "3"]
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "domain": "chat"}]
    datasets.Dataset.from_list(chat).save_to_disk(str(tmp_path / "saved"))
    prompts, _ = load_prompts(str(tmp_path / "saved"), tok, SPECS, 64, skip_bad_rows=False)
    assert tok.decode(prompts[0].prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_missing_file(tok):
    with pytest.raises(DataError, match="/no/such.jsonl: data file does not exist"):
        load_prompts("/no/such.jsonl", tok, SPECS, 64, skip_bad_rows=False)


def test_stream_resume_is_exact(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "answer": str(i)} for i in range(7)])
    prompts, _ = load_prompts(path, tok, SPECS, 64, skip_bad_rows=False)
    full = PromptStream(prompts, seed=3)
    seen = [p.row["answer"] for _ in range(5) for p in full.next(3)]  # crosses two epoch boundaries
    a = PromptStream(prompts, seed=3)
    first = [p.row["answer"] for _ in range(2) for p in a.next(3)]
    b = PromptStream(prompts, seed=3)
    b.restore(a.position)
    rest = [p.row["answer"] for _ in range(3) for p in b.next(3)]
    assert first + rest == seen
    assert sorted(seen[:7]) == sorted(str(i) for i in range(7))  # each epoch is a permutation


def test_rows_with_tools_list_them_in_the_system_turn(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "tools": ["python"]}, GOOD])
    (with_tools, plain), _ = load_prompts(path, tok, SPECS, 512, skip_bad_rows=False)
    text = tok.decode(with_tools.prompt_ids)
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>\n") and '"name": "python"' in text
    assert with_tools.prompt_ids[-len(plain.prompt_ids):] == plain.prompt_ids  # the same user turn after it
