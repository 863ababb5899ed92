"""rl.pipeline.score: what a reward function receives (TRL's keyword arguments)."""
from __future__ import annotations

import pytest

from rewards import parse_specs
from rewards.pool import ScoringPool
from rl import pipeline
from rollout.sample import Sample, Status


def test_scorers_get_trl_prompts_and_completion_ids(tiny_dense):
    """`completion_ids` are the tokens the scored text decodes (an episode's final turn), `prompts` the
    rows' prompts as in the data; `helper_scorers:trl_reward` adds 0.01 per id and 0.001 per prompt item."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    plain, answer = tok("Paris", add_special_tokens=False)["input_ids"], tok("Lyon", add_special_tokens=False)["input_ids"]
    tool_result = [7, 8, 9]
    row = {"prompt": [{"role": "user", "content": "Capital?"}], "domain": "geo", "solution": "Paris"}
    samples = [
        Sample([1], plain, loss_mask=[1] * len(plain), status=Status.COMPLETED, domain="geo", metadata=row),
        Sample([1], plain + tool_result + answer, loss_mask=[1] * len(plain) + [0] * 3 + [1] * len(answer),
               status=Status.COMPLETED, domain="geo", metadata={**row, "prompt": "Capital of France?"},
               tool_stats={"tool_calls": 1}),
    ]
    specs = parse_specs({"geo": {"correct": {"scorer": "tests.rewards.helper_scorers:trl_reward"}}})
    pipeline.score(samples, specs, ScoringPool(timeout_s=10), tok)
    assert samples[0].reward == pytest.approx(1 + 0.01 * len(plain) + 0.001 * 1)  # one message
    assert samples[1].text == "Lyon"
    assert samples[1].reward == pytest.approx(0 + 0.01 * len(answer) + 0.001 * len("Capital of France?"))


def test_domains_scored_at_once_keep_their_rewards_and_events(tiny_dense):
    """Domains are scored concurrently: each sample gets its own domain's scores, and every domain's scoring
    events reach this call's metrics (crashy abstains on 'boom': one exception event per domain)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    crashy, length = "tests.rewards.helper_scorers:crashy", "tests.rewards.helper_scorers:sleepy"  # sleepy: len(text)
    domains = ["a", "b", "c"]
    specs = parse_specs({d: {"ok": {"scorer": crashy}, "len": {"scorer": length, "weight": 0.0}} for d in domains})
    samples = []
    for i, d in enumerate(domains * 2):
        ids = tok("boom" if i < 3 else "fine " * (i + 1), add_special_tokens=False)["input_ids"]
        samples.append(Sample([1], ids, loss_mask=[1] * len(ids), status=Status.COMPLETED, domain=d,
                              metadata={"prompt": "p", "domain": d}))
    metrics = pipeline.score(samples, specs, ScoringPool(timeout_s=10), tok)
    assert [s.rewards["ok"] for s in samples] == [None] * 3 + [1.0] * 3
    assert [s.rewards["len"] for s in samples] == [pytest.approx(len(s.text)) for s in samples]
    assert metrics[f"events/{crashy}:exception"] == 3


def test_domains_are_scored_at_the_same_time(tiny_dense):
    """Three domains whose scorer returns only when all three are running at once (a sequential loop over
    the domains would break its barrier and raise)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    specs = parse_specs({d: {"ok": {"scorer": "tests.rewards.helper_scorers:together"}} for d in "abc"})
    ids = tok("x", add_special_tokens=False)["input_ids"]
    samples = [Sample([1], ids, loss_mask=[1] * len(ids), status=Status.COMPLETED, domain=d, metadata={"prompt": "p", "domain": d})
               for d in "abc"]
    pipeline.score(samples, specs, ScoringPool(timeout_s=10, isolate=False), tok)
    assert [s.reward for s in samples] == [1.0] * 3
