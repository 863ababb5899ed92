"""Tiny random-initialised Qwen3 / Qwen3-MoE checkpoints with a real tokenizer, for tests and the quickstart.

The checkpoints are ordinary HF directories (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with the chat template): transformers' `AutoModelForCausalLM.from_pretrained` and
vLLM load them the same way they load a downloaded model, so everything that runs on them runs on a real
checkpoint too. Same `seed` -> byte-identical weights and tokenizer.

The tokenizer is a byte-level BPE trained on the fly on a small deterministic corpus (digits, arithmetic,
English words, common Chinese characters, JSON punctuation), with ChatML, thinking and tool-call tags as
added tokens. It is small (~1k tokens) so the models are tiny; it is not meant to be good at anything.

    python -m rollout.tiny_models --kind moe --out /tmp/tiny_moe
"""
from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not "special": they are text the model writes and the scorers read (as in Qwen3).
TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
CHAT_TEMPLATE = (Path(__file__).parent / "assets" / "chat_template.jinja").read_text()

_EN_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from what how many much "
    "answer question number sum add plus minus times divided equal equals result total first second then "
    "so think step let we have get is are compute reverse string word letter count sort list apple book "
    "cat dog red blue green one two three four five six seven eight nine ten hundred thousand yes no true "
    "false call tool search python read file name arguments query code return print def final because"
).split()
_ZH_CHARS = "的一是不了人我在有他这中大来上个国和也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从零四五六七八九百千加减乘除等于答案问题计算多少个数字反转字符串"  # noqa: E501
_PUNCT = list("0123456789+-*/=()[]{}<>.,:;!?'\"_#@$%&|\\^~` \n\t，。？！：；（）")


def tokenizer_corpus(seed: int, n_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        words = " ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(3, 12)))
        zh = "".join(rng.choice(_ZH_CHARS) for _ in range(rng.randint(2, 12)))
        lines.append(f"{words} {a} {op} {b} = {eval(f'{a}{op}{b}')}. {zh}")
        lines.append(json.dumps({"name": rng.choice(_EN_WORDS), "arguments": {"query": words}}))
        lines.append("\\boxed{" + str(rng.randint(-99, 999)) + "} " + "".join(rng.sample(_PUNCT, 8)))
    return lines


def build_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """A byte-level BPE `PreTrainedTokenizerFast` with the ChatML/thinking/tool chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(TAG_TOKENS)
    return fast


_COMMON = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
KINDS = {
    "dense": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=256)),
    "moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=256,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            router_aux_loss_coef=0.0,
        ),
    ),
}


def build_tiny_model(kind: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "float32",
                     dsa_top_k: int | None = None, **overrides) -> Path:
    """Write a random-initialised `kind` ('dense' or 'moe') checkpoint + tokenizer to `out_dir`.

    `overrides` go into the HF config (e.g. `num_hidden_layers=4`); `dsa_top_k` adds DeepSeek Sparse
    Attention (`rollout.dsa`) with that many keys per query. Returns the directory.
    """
    import torch
    import transformers

    if kind not in KINDS:
        raise ValueError(f"Unknown tiny model kind '{kind}'. Supported: {sorted(KINDS)}")
    cfg_cls, model_cls, extra = KINDS[kind]
    tokenizer = build_tokenizer(seed)
    tokens = dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, cfg_cls)(**{**tokens, **_COMMON, **extra, **overrides})
    config.architectures = [model_cls]  # vLLM picks the runner from this (see shared/gpu/README.md)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(getattr(torch, dtype))
    if dsa_top_k is not None:
        from rollout.dsa import install_dsa

        install_dsa(model, dsa_top_k)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=sorted(KINDS), default="moe")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_tiny_model(args.kind, args.out, args.seed))


if __name__ == "__main__":
    main()
