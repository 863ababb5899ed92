"""Language consistency (DeepSeek-R1): the fraction of the chain of thought's words that are in the target
language. Length penalties live here too (both score the *shape* of a completion, not its correctness).

Words are counted by script first: every Han character is one word (Chinese has no spaces; R1 counts
the same way), kana and Hangul characters likewise; Latin- and Cyrillic-script words are runs of
letters. Runs of same-script words between other scripts are assigned a language with `lingua` (a real
language identifier, restricted to common languages of that script), so "the cat" and "le chat" differ.

Deviations: R1 does not publish its word counter; digits, punctuation, LaTeX commands and code are not
words here. Japanese text's Han characters count as Japanese when the text contains kana.
"""
from __future__ import annotations

import functools
import re

from rewards.base import column, record_event, register_scorer, split_thinking

_TOKEN = re.compile(
    r"(?P<han>[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])"
    r"|(?P<kana>[\u3040-\u30ff])"
    r"|(?P<hangul>[\uac00-\ud7af])"
    r"|(?P<latin>[A-Za-z\u00c0-\u024f]+(?:'[A-Za-z]+)?)"
    r"|(?P<cyrillic>[\u0400-\u04ff]+)"
    r"|\\[A-Za-z]+"  # LaTeX commands are not words
)
_LATIN = ("ENGLISH", "FRENCH", "GERMAN", "SPANISH", "ITALIAN", "PORTUGUESE", "DUTCH", "INDONESIAN", "TURKISH", "VIETNAMESE")
_CYRILLIC = ("RUSSIAN", "UKRAINIAN", "BULGARIAN")


@functools.lru_cache(maxsize=None)
def _detector(script: str):
    from lingua import Language, LanguageDetectorBuilder

    names = _LATIN if script == "latin" else _CYRILLIC
    # Preloaded (~350 MB for both scripts, ~2.5 s once): lingua otherwise loads each language's model at its
    # first detection, which a forked scorer child would redo at every call (rewards.pool warms this in the
    # parent; measured on 64 completions: 0.16 s per batch vs 0.24 s lazy, 0.53 s with nothing warmed).
    return LanguageDetectorBuilder.from_languages(*(getattr(Language, n) for n in names)).with_preloaded_language_models().build()


def _detect(script: str, words: list[str]) -> str:
    lang = _detector(script).detect_language_of(" ".join(words))
    return lang.iso_code_639_1.name.lower() if lang is not None else "unknown"


_MIN_RUN = 3  # shorter runs borrow context: single words are where identifiers guess wildly


def word_languages(text: str) -> list[str]:
    """One ISO 639-1 code per word of `text`, in order (see module docstring for what a word is).

    A run of fewer than 3 Latin/Cyrillic words (a term inside Chinese text, say) is identified from all
    of the text's words of that script together; if those are still fewer than 3, ASCII-only Latin words
    count as English (a deliberate prior: in mixed-language reasoning, short Latin insertions are
    overwhelmingly English, and "compute" alone is ambiguous to any identifier).
    """
    has_kana = bool(re.search(r"[\u3040-\u30ff]", text))
    items: list[tuple[str, list[str] | str]] = []  # ("run", [words], script) or ("lang", code)
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind is None:  # a LaTeX command: neither a word nor a break in a run
            continue
        if kind in ("latin", "cyrillic"):
            if items and items[-1][0] == kind:
                items[-1][1].append(m.group())
            else:
                items.append((kind, [m.group()]))
        else:
            items.append(("lang", {"han": "ja" if has_kana else "zh", "kana": "ja", "hangul": "ko"}[kind]))
    by_script = {s: [w for k, ws in items if k == s for w in ws] for s in ("latin", "cyrillic")}
    out: list[str] = []
    for kind, val in items:
        if kind == "lang":
            out.append(val)
            continue
        if len(val) >= _MIN_RUN:
            lang = _detect(kind, val)
        elif len(by_script[kind]) >= _MIN_RUN:
            lang = _detect(kind, by_script[kind])
        elif kind == "latin" and all(w.isascii() for w in val):
            lang = "en"
        else:
            lang = _detect(kind, val)
        out.extend([lang] * len(val))
    return out


def dominant_language(text: str) -> str | None:
    langs = word_languages(text)
    return max(set(langs), key=langs.count) if langs else None


def language_consistency(text: str, target: str) -> float | None:
    """Fraction of words of `text` in `target` (ISO 639-1); None when there are no words."""
    langs = word_languages(text)
    return sum(lang == target for lang in langs) / len(langs) if langs else None


def _warm_language() -> None:
    for script in ("latin", "cyrillic"):
        _detector(script)


@register_scorer("language_consistency", warm=_warm_language)
def language_scorer(completions: list[str], language: list | None = None, prompt: list | None = None, **_):
    """Language consistency of the reasoning (inside the thinking tags; the whole text when there are
    none). Target: the row's `language`, else the dominant language of the row's `prompt`. Abstains
    (None, counted) when there is no target or no word to judge."""
    n = len(completions)
    targets, prompts = column({"l": language}, "l", n), column({"p": prompt}, "p", n)
    out: list[float | None] = []
    for text, target, p in zip(completions, targets, prompts):
        reasoning, _ = split_thinking(text)
        target = target or (dominant_language(p) if p else None)
        score = language_consistency(reasoning if reasoning is not None else text, target) if target else None
        if score is None:
            record_event("language_consistency", "no_target" if not target else "no_words")
        out.append(score)
    return out


def overlong_penalty(n_tokens: int, soft_limit: int, hard_limit: int) -> float:
    """DAPO's overlong shaping: 0 up to `soft_limit`, linear down to -1 at `hard_limit`, -1 beyond."""
    if n_tokens <= soft_limit:
        return 0.0
    return -min(1.0, (n_tokens - soft_limit) / max(hard_limit - soft_limit, 1))


@register_scorer("length")
def length_scorer(
    completions: list[str],
    num_tokens: list | None = None,
    truncated: list | None = None,
    soft_limit: int | None = None,
    hard_limit: int | None = None,
    per_token: float = 0.0,
    **_,
) -> list[float | None]:
    """A length penalty (<= 0): overlong shaping between `soft_limit` and `hard_limit` (both or neither)
    plus `per_token` * length. Lengths are the row's `num_tokens` (the pipeline fills it from the Sample);
    without it, whitespace-separated words. A truncated completion (row field `truncated`) gets the full
    overlong penalty whatever its length and is counted as `length:truncated`."""
    if (soft_limit is None) != (hard_limit is None) or (soft_limit is not None and hard_limit < soft_limit):
        raise ValueError(f"length scorer: soft_limit={soft_limit} and hard_limit={hard_limit} must be set together, soft <= hard")
    n = len(completions)
    lengths = column({"t": num_tokens}, "t", n)
    flags = column({"t": truncated}, "t", n, False)
    out: list[float | None] = []
    for text, length, trunc in zip(completions, lengths, flags):
        length = len(text.split()) if length is None else int(length)
        pen = -per_token * length
        if soft_limit is not None:
            pen += -1.0 if trunc else overlong_penalty(length, soft_limit, hard_limit)
        if trunc:
            record_event("length", "truncated")
        out.append(pen)
    return out
