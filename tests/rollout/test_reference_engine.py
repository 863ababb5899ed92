"""The reference engine's captures are exact: log-probs vs a transformers forward, routed experts vs the HF
router's own top-k on the same tokens, kept sets vs the processed distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout.engine import EngineConfig, SamplingConfig
from rollout.reference_engine import ReferenceEngine, load_hf_model
from rollout.routing import RoutingController
from rollout.sampling import process_logits

# Same fp32 weights, same modules; the residual is KV-cached + left-padded vs one full forward (different
# summation order in attention), measured below 1e-5.
LOGPROB_ATOL = 1e-5
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 9]


@pytest.fixture(scope="module")
def ref_moe(tiny_moe):
    return ReferenceEngine(EngineConfig(model=tiny_moe, engine="reference", max_model_len=256, seed=0))


def _full_forward(model, ctl, s, temperature=1.0, top_k=0, top_p=1.0):
    ids = torch.tensor([s.prompt_ids + s.response_ids[:-1]])
    with torch.no_grad(), ctl.capture():
        logits = model(ids).logits[0, len(s.prompt_ids) - 1 :]
        routed = ctl.take_captured()[0] if ctl.is_moe else None
    processed = process_logits(logits, temperature, top_k, top_p)
    logp = torch.log_softmax(processed, -1).gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1)
    return logp, routed, processed


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.2, 20, 0.95)])
def test_logprobs_routing_and_masks_are_exact(ref_moe, tiny_moe, temperature, top_k, top_p):
    sp = SamplingConfig(n=2, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=10, seed=1)
    groups = ref_moe.generate(PROMPTS, sp)
    assert [[s.prompt_ids for s in g] for g in groups] == [[p, p] for p in PROMPTS]
    samples = [s for g in groups for s in g]
    model = load_hf_model(tiny_moe, "float32")
    ctl = RoutingController(model)
    for s in samples:
        logp, routed, processed = _full_forward(model, ctl, s, temperature, top_k, top_p)
        assert (torch.tensor(s.logprobs) - logp).abs().max() < LOGPROB_ATOL
        assert s.routed_experts.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2)
        # Routed experts equal the HF router's top-k on the same tokens (as sets: top-k order is not API).
        assert np.array_equal(np.sort(s.routed_experts, -1), np.sort(routed.numpy(), -1))
        if top_k or top_p < 1:
            for t in range(len(s.response_ids)):
                got = set(s.kept.row(t).tolist())
                assert got == set(torch.isfinite(processed[t]).nonzero().squeeze(-1).tolist())
                assert s.response_ids[t] in got
                if top_k:
                    assert len(got) <= top_k
        else:
            assert s.kept is None


def test_top_p_matches_definition():
    # p = [0.5, 0.3, 0.15, 0.05]; top_p 0.8 keeps the smallest prefix with mass >= 0.8: {0, 1}.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(process_logits(logits, 1.0, 0, 0.8))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(process_logits(logits, 1.0, 0, 0.81))[0].tolist() == [True, True, True, False]
    assert torch.isfinite(process_logits(logits, 1.0, 1, 1.0))[0].tolist() == [True, False, False, False]


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(ref_moe):
    g = SamplingConfig(n=2, temperature=0.0, max_tokens=8)
    [[a, b]] = ref_moe.generate(PROMPTS[:1], g)
    assert a.response_ids == b.response_ids and all(lp == 0.0 for lp in a.logprobs)
    sp = SamplingConfig(n=3, max_tokens=8, seed=7)
    assert [[s.response_ids for s in g] for g in ref_moe.generate(PROMPTS, sp)] == \
        [[s.response_ids for s in g] for g in ref_moe.generate(PROMPTS, sp)]


def test_stop_and_length(tiny_moe, ref_moe):
    eos = load_hf_model(tiny_moe, "float32").config.eos_token_id
    # Force the stop token as soon as it is likely enough: any sampled stop id ends the sample.
    sp = SamplingConfig(n=4, max_tokens=6, seed=3, stop_token_ids=tuple(range(0, 1030, 2)))
    for s in [s for g in ref_moe.generate(PROMPTS, sp) for s in g]:
        stopped = s.response_ids[-1] % 2 == 0 or s.response_ids[-1] == eos
        assert (s.finish_reason == "stop") == stopped
        assert s.finish_reason == "stop" or len(s.response_ids) == 6
        assert all(t % 2 == 1 for t in s.response_ids[:-1])
