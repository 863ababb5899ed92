"""Language consistency golden examples (Chinese/English mixes, same-script languages) and length penalties."""
from __future__ import annotations

import pytest

import rewards
from rewards import get_scorer
from rewards.language import language_consistency, overlong_penalty, word_languages
from rewards.testing import assert_scores


@pytest.mark.parametrize(
    "text,langs",
    [
        ("the cat sits on the mat", ["en"] * 6),
        ("le chat est sur la table et il dort", ["fr"] * 9),
        ("Der Hund schläft im Garten und träumt", ["de"] * 7),
        ("我们先计算 the sum 然后 divide by two", ["zh"] * 5 + ["en"] * 2 + ["zh"] * 2 + ["en"] * 3),
        ("首先 compute 12+30=42，所以答案是 42", ["zh", "zh", "en"] + ["zh"] * 5),
        ("\\frac{1}{2} 等于 0.5", ["zh", "zh"]),
        ("Сначала посчитаем сумму", ["ru"] * 3),
        ("これは日本語です", ["ja"] * 8),
        ("12 + 30 = 42", []),
    ],
)
def test_word_languages_golden(text, langs):
    assert word_languages(text) == langs


def test_consistency_is_fraction_of_target_words():
    mixed = "我们先计算 the sum 然后 divide by two"  # 7 Chinese words, 5 English words
    assert language_consistency(mixed, "zh") == pytest.approx(7 / 12)
    assert language_consistency(mixed, "en") == pytest.approx(5 / 12)
    assert language_consistency("le chat est sur la table", "en") == 0.0  # same script, other language
    assert language_consistency("42", "en") is None


def test_scorer_reads_reasoning_and_falls_back_to_prompt_language():
    rewards.take_events()
    comps = ["<think>我们先计算 the sum</think> The answer is 5", "just english words here", "<think>42</think>x"]
    # Only the reasoning is scored when there are thinking tags: 5 zh + 2 en words.
    got = get_scorer("language_consistency")(comps, language=["zh", None, "en"], prompt=["", "what is one plus one", ""])
    assert got == [pytest.approx(5 / 7), 1.0, None]
    assert rewards.take_events() == {"language_consistency:no_words": 1}


def test_overlong_shaping_and_per_token_cost():
    assert [overlong_penalty(n, 10, 20) for n in (5, 10, 15, 20, 40)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert_scores("length", ["a"] * 4, [0.0, -0.5, -1.0, -1.0], num_tokens=[10, 15, 25, 3],
                  truncated=[False, False, False, True], options=dict(soft_limit=10, hard_limit=20))
    assert_scores("length", ["one two three", "x"], [-0.03, -0.5], num_tokens=[None, 50], options=dict(per_token=0.01))


def test_truncation_is_flagged():
    rewards.take_events()
    get_scorer("length")(["a", "b"], num_tokens=[1, 1], truncated=[True, False], soft_limit=5, hard_limit=9)
    assert rewards.take_events() == {"length:truncated": 1}


def test_length_limits_validated():
    with pytest.raises(ValueError, match="must be set together"):
        get_scorer("length")(["a"], soft_limit=5)
