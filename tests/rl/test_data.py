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


def _cfg(**kw):
    from rl.config import DataConfig

    return DataConfig(train="unused", **kw)


def test_column_mapping_and_default_domain(tmp_path, tok):
    path = _write(tmp_path / "gsm.jsonl", [{"question": "What is 2 + 2?", "solution": "4", "id": 7}])
    (p,), _ = load_prompts(path, tok, SPECS, 64, False, data_cfg=_cfg(prompt_key="question", answer_key="solution",
                                                                        domain="math"))
    assert p.row == {"prompt": "What is 2 + 2?", "answer": "4", "id": 7, "domain": "math"}
    # A general mapping; rows that have a domain keep it, rows with none get data.domain.
    path = _write(tmp_path / "mixed.jsonl", [{"q": "hi", "d": "chat"}, {"q": "1+1?", "gold": "2", "d": None}])
    prompts, _ = load_prompts(path, tok, SPECS, 64, False,
                              data_cfg=_cfg(columns={"q": "prompt", "gold": "answer", "d": "domain"}, domain="math"))
    assert [(p.row["domain"], p.row["answer"]) for p in prompts] == [("chat", None), ("math", "2")]
    with pytest.raises(DataError, match=r"gsm.jsonl: no column 'problem' to use as 'prompt' \(columns: \["):
        load_prompts(str(tmp_path / "gsm.jsonl"), tok, SPECS, 64, False, data_cfg=_cfg(prompt_key="problem"))


def test_dataset_folder_by_name_with_split_and_subset(tmp_path, tok, monkeypatch):
    """A local folder goes through `datasets.load_dataset(name, subset, split=...)` like a hub name."""
    folder = tmp_path / "my_ds"
    folder.mkdir()
    _write(folder / "train.jsonl", [{**GOOD, "answer": "train"}] * 2)
    _write(folder / "test.jsonl", [{**GOOD, "answer": "test"}])
    cfg = _cfg(split="train", eval_split="test")
    train, _ = load_prompts(str(folder), tok, SPECS, 64, False, data_cfg=cfg)
    evals, _ = load_prompts(str(folder), tok, SPECS, 64, False, data_cfg=cfg, which="eval")
    assert [p.row["answer"] for p in train] == ["train", "train"] and [p.row["answer"] for p in evals] == ["test"]
    # A subset (configuration) declared in the dataset card, as hub datasets do.
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: hard\n  data_files:\n  - split: train\n"
                                      "    path: test.jsonl\n- config_name: default\n  data_files:\n"
                                      "  - split: train\n    path: train.jsonl\n---\n")
    hard, _ = load_prompts(str(folder), tok, SPECS, 64, False, data_cfg=_cfg(subset="hard"))
    assert [p.row["answer"] for p in hard] == ["test"]
    with pytest.raises(DataError, match=r"data.eval='.*my_ds': datasets.load_dataset cannot load it \(split='validation'"):
        load_prompts(str(folder), tok, SPECS, 64, False, data_cfg=_cfg(eval_split="validation"), which="eval")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the hub is not reachable from tests
    with pytest.raises(DataError, match=r"data.train='nobody/no-such-dataset': datasets.load_dataset cannot load it"):
        load_prompts("nobody/no-such-dataset", tok, SPECS, 64, False, data_cfg=_cfg())


def test_saved_dataset_dict_split(tmp_path, tok):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD]),
                          "test": datasets.Dataset.from_list([{**GOOD, "answer": "9"}])}).save_to_disk(str(tmp_path / "dd"))
    (p,), _ = load_prompts(str(tmp_path / "dd"), tok, SPECS, 64, False, data_cfg=_cfg(), which="eval")
    assert p.row["answer"] == "9"
    with pytest.raises(DataError, match=r"dd: no split 'dev' in the saved dataset \(splits: \['test', 'train'\]\)"):
        load_prompts(str(tmp_path / "dd"), tok, SPECS, 64, False, data_cfg=_cfg(split="dev"))


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_named(tmp_path, tok, content):
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(DataError, match=r"empty.jsonl: the data file is empty"):
        load_prompts(str(tmp_path / "empty.jsonl"), tok, SPECS, 64, skip_bad_rows=False)


def test_skipped_rows_are_logged_once(tmp_path, tok, capsys):
    bad = [{"prompt": "x", "domain": "math"}, {"domain": "chat"}, {"prompt": " ", "domain": "math", "answer": "1"},
           {"prompt": "x", "domain": "poetry"}]
    path = _write(tmp_path / "d.jsonl", [GOOD, *bad])
    load_prompts(path, tok, SPECS, 64, skip_bad_rows=True)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data:")]  # not datasets' bars
    assert len(err) == 1 and err[0].startswith(f"data: skipped 4 of 5 rows of {path} (data.skip_bad_rows=true): ")
    assert "d.jsonl:2: missing 'answer'" in err[0] and "d.jsonl:4: empty prompt; ..." in err[0]
    assert "poetry" not in err[0]  # the first few reasons, not all of them


def test_tokenising_map_runs_in_processes_and_is_cached(tmp_path, tok, monkeypatch):
    path = _write(tmp_path / "d.jsonl", [{**GOOD, "answer": str(i)} for i in range(6)] + [{"prompt": "x", "domain": "math"}])
    first, skipped = load_prompts(path, tok, SPECS, 64, True, data_cfg=_cfg(num_proc=2))
    assert [p.row["answer"] for p in first] == [str(i) for i in range(6)] and len(skipped) == 1
    import rl.data

    assert first[0].prompt_ids == rl.data.encode_prompt(tok, GOOD)

    def boom(*a, **k):
        raise AssertionError("tokenised again instead of reading datasets' cache")

    monkeypatch.setattr(rl.data, "encode_prompt", boom)
    again, _ = load_prompts(path, tok, SPECS, 64, True, data_cfg=_cfg(num_proc=2))
    assert [(p.row, p.prompt_ids) for p in again] == [(p.row, p.prompt_ids) for p in first]
    # Changed encoding code is a cache miss (datasets alone would hash the map function by its name).
    monkeypatch.setattr(rl.data, "_encoding_code", lambda: "an upgraded encoder")
    with pytest.raises(DataError, match="d.jsonl:1: the chat template cannot render the prompt .*tokenised again"):
        load_prompts(path, tok, SPECS, 64, False, data_cfg=_cfg())
