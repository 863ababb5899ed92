"""SFT from the user's own demonstrations: `distill.specialists.<domain>=data:<source>`, the prompt column
mapped like data.train (data.prompt_key), the response column `distill.response_key`; mistakes (a response
column under another name, an empty response, a row that does not fit) are named with file:row."""
from __future__ import annotations

import json

import pytest

from rl.config import ConfigError, load_config
from rl.data import DataError, encode_prompt
from rl.distill import demonstration_samples, demonstrations, distill


@pytest.fixture(scope="module")
def tok(tiny_dense):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dense)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"question": "What is 2 + 2?", "completion": "\\boxed{4}"},
        {"question": "What is 3 + 4?", "completion": "\\boxed{7}", "domain": "math"},
        {"question": "First letter of cat?", "completion": "c", "domain": "string"}]


def test_demonstrations_with_mapped_columns(tok, tmp_path):
    src = _jsonl(tmp_path / "demos.jsonl", ROWS)
    cfg = load_config([f"distill.specialists={{math: 'data:{src}'}}", "data.prompt_key=question",
                       "distill.response_key=completion"])
    (got,) = demonstrations(cfg, tok).values()
    assert len(got) == 2  # the row without a domain is math's; the string row is left out
    s = got[0]
    assert s.prompt_ids == encode_prompt(tok, {"prompt": "What is 2 + 2?"})
    assert s.response_ids == tok("\\boxed{4}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.loss_mask == [1] * len(s.response_ids) and s.domain == "math" and s.text == "\\boxed{4}"

    # A saved dataset directory works the same (anything data.train takes).
    import datasets

    datasets.Dataset.from_list([{"prompt": "Say hi", "response": "hi"}]).save_to_disk(str(tmp_path / "saved"))
    cfg = load_config([f"distill.specialists={{math: 'data:{tmp_path / 'saved'}'}}"])
    assert [s.text for s in demonstrations(cfg, tok)["math"]] == ["hi"]


def test_demonstration_mistakes_are_named(tok, tmp_path):
    src = _jsonl(tmp_path / "demos.jsonl", ROWS)
    cfg = load_config(["data.prompt_key=question"])  # distill.response_key left at 'response'
    with pytest.raises(DataError, match=r"demos.jsonl: no column 'response' with the responses \(distill.response_key; "
                                        r"columns: \[.*'completion'.*\]\)"):
        demonstration_samples(cfg, tok, "math", src)
    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "What is 1 + 1?", "completion": " "},
                                          {"question": "x " * 600, "completion": "y"}])
    cfg = load_config(["data.prompt_key=question", "distill.response_key=completion"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: empty or missing response \('completion', distill.response_key\)"):
        demonstration_samples(cfg, tok, "math", bad)
    cfg = load_config(["data.prompt_key=question", "distill.response_key=completion", "data.skip_bad_rows=true"])
    assert [s.text for s in demonstration_samples(cfg, tok, "math", bad)] == ["\\boxed{4}"]  # 2 skipped (counted)
    with pytest.raises(DataError, match=r"nothing.jsonl: data file does not exist"):
        demonstration_samples(cfg, tok, "math", str(tmp_path / "nothing.jsonl"))
    with pytest.raises(ConfigError, match=r"^distill.specialists.poetry: 'data:' needs a source"):
        load_config(["distill.specialists={poetry: 'data:'}"])
    with pytest.raises(ConfigError, match=r"^distill.specialists.poetry: domain 'poetry' has no reward spec"):
        load_config(["distill.specialists={poetry: rule}"])
    load_config(["distill.specialists={poetry: 'data:demos.jsonl'}"])  # demonstrations need no reward spec


def test_demonstrations_are_trained_as_they_are(tok, tmp_path):
    """No scorer filters the user's demonstrations (a wrong answer in a curated set is still trained)."""
    src = _jsonl(tmp_path / "demos.jsonl", ROWS)
    cfg = load_config([f"distill.specialists={{math: 'data:{src}'}}", "data.prompt_key=question",
                       "distill.response_key=completion", "distill.batch_size=1", "distill.epochs=2"])
    seen = []

    class Learner:
        def set_lr(self, lr):
            seen.append(("lr", lr))

        def train_step(self, batch, loss):
            seen.extend((loss, s.text) for s in batch)
            return {"nll": 2.0 - len(seen) / 10}

        def reset_reference(self):
            seen.append("reset_reference")

    metrics = distill(cfg, tok, {}, None, None, [], Learner(), demonstrations(cfg, tok))
    assert metrics["distill/examples"] == 2 and metrics["distill/math/kept_frac"] == 1.0
    assert sorted(t for kind, t in seen[1:5]) == ["\\boxed{4}", "\\boxed{4}", "\\boxed{7}", "\\boxed{7}"]
    assert all(kind == "sft" for kind, _ in seen[1:5]) and seen[-1] == "reset_reference"
