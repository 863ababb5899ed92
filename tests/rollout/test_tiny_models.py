from __future__ import annotations

import hashlib

import pytest
import torch

from rollout.tiny_models import build_tiny_model


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_deterministic_given_seed(tmp_path, tiny_moe):
    from pathlib import Path

    again = build_tiny_model("moe", tmp_path / "a", seed=0)
    other = build_tiny_model("moe", tmp_path / "b", seed=1)
    assert _digest(again) == _digest(Path(tiny_moe))
    assert (again / "tokenizer.json").read_bytes() == (Path(tiny_moe) / "tokenizer.json").read_bytes()
    assert _digest(other) != _digest(again)


@pytest.mark.parametrize("fixture,arch", [("tiny_dense", "Qwen3ForCausalLM"), ("tiny_moe", "Qwen3MoeForCausalLM")])
def test_loads_with_transformers_and_chat_template(request, fixture, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == arch
    assert model.config.vocab_size == len(tok)
    msgs = [
        {"role": "user", "content": "what is 2+3? 计算"},
        {"role": "assistant", "reasoning_content": "2 plus 3", "content": "\\boxed{5}",
         "tool_calls": [{"function": {"name": "search", "arguments": {"query": "x"}}}]},
        {"role": "tool", "content": "5"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<think>\n2 plus 3\n</think>" in text and '<tool_call>\n{"name": "search"' in text
    assert "<tool_response>\n5\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips, Chinese included
    for tag in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<|im_end|>"):
        assert len(tok(tag)["input_ids"]) == 1, tag
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits
    assert out.shape == (1, len(ids), len(tok)) and torch.isfinite(out).all()


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown tiny model kind 'big'. Supported: \['dense', 'moe'\]"):
        build_tiny_model("big", tmp_path)
