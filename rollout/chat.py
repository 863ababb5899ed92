"""Chat encoding helpers shared by the engines, the driver and the learner (token ids, never text twice)."""
from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, tools=None, **kw) -> list[int]:
    """Render `messages` with the tokenizer's chat template and return token ids.

    Goes through text on purpose (template -> text -> ids with no extra special tokens) because
    transformers' `apply_chat_template(tokenize=True)` changed its return type between 4.x and 5.x.
    """
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools, **kw
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
