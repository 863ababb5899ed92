"""Chat encoding helpers shared by the engines, the driver and the learner (token ids, never text twice)."""
from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, tools=None, **kw) -> list[int]:
    """Render `messages` with the tokenizer's chat template and return token ids. `kw` are the template's
    own arguments (`enable_thinking`, ...).

    Goes through text on purpose (template -> text -> ids with no extra special tokens) because
    transformers' `apply_chat_template(tokenize=True)` changed its return type between 4.x and 5.x.
    """
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools, **kw
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TemplateError(ValueError):
    """The chat template cannot be rendered append-only."""


def continuation(tokenizer, messages: list[dict], new: list[dict], template_args: dict | None = None) -> str:
    """The text the chat template appends after the model's turn that ends `messages` (its stop token,
    `tokenizer.eos_token`, the model's own last token) when `new` messages follow, up to and including the
    next generation prompt: `render(messages + new, add_generation_prompt=True)` with
    `render(messages)` cut after its last stop token taken off.

    An episode's token stream is append-only (the model's tokens are never re-tokenised), so the shorter
    rendering must be a prefix of the longer; a template that rewrites earlier turns when a message
    follows is an error, not silently a different context."""
    kw = template_args or {}
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    short = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **kw)
    long = tokenizer.apply_chat_template(messages + new, tokenize=False, add_generation_prompt=True, **kw)
    stop = tokenizer.eos_token
    end = short.rfind(stop) + len(stop) if stop and stop in short else -1
    if end < 0:
        raise TemplateError(f"the chat template of {name!r} does not end an assistant turn with the stop token "
                            f"{stop!r}, so the model's turn cannot be continued append-only")
    if not long.startswith(short[:end]):
        at = next((i for i, (a, b) in enumerate(zip(short, long)) if a != b), min(end, len(long)))
        raise TemplateError(
            f"the chat template of {name!r} is not append-only: rendering {[m['role'] for m in new]} after the "
            f"conversation changes what comes before (at character {at}: {short[at:at + 40]!r} became "
            f"{long[at:at + 40]!r}); tool-use episodes need a template whose rendering only grows")
    return long[end:]
