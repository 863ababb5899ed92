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
