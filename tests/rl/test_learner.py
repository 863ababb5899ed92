"""The learner on real components: FSDP2 over gloo (1 and 2 processes), the reference engine's samples."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rl.learner import Learner, LearnerConfig, LearnerGroup, _PerRank, step_totals
from rollout.engine import EngineConfig, SamplingConfig
from rollout.reference_engine import ReferenceEngine

SAMPLING = SamplingConfig(n=4, temperature=0.8, top_p=0.9, max_tokens=10, seed=0)
PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [42, 43], [9, 8, 7, 6, 5]]


@pytest.fixture(scope="module")
def moe_samples(tiny_moe):
    eng = ReferenceEngine(EngineConfig(model=tiny_moe, engine="reference", seed=0))
    samples = eng.generate(PROMPTS, SAMPLING)
    for i, s in enumerate(samples):
        s.advantage = [1.0, -1.0, 0.5, -0.5][i % 4]
    return samples


@pytest.fixture(scope="module")
def learner(tiny_moe):
    """One in-process rank (world size 1, gloo), shared by the single-process tests."""
    cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, kl_coefs={"default": 0.1}, opsm_delta=0.5)
    return Learner(cfg)


def test_step0_identity(learner, moe_samples):
    """Engine and learner hold the same weights: ratio 1 within 1e-6 and KL < 1e-8 (reference engine)."""
    lp = learner.logprobs(moe_samples)
    err = max(abs(a - b) for s, l in zip(moe_samples, lp) for a, b in zip(s.logprobs, l))
    assert err < 1e-6, err
    sums = learner.accumulate_grads(moe_samples, step_totals(moe_samples, 1, learner.cfg.micro_batch_size))
    learner.optimizer.zero_grad(set_to_none=True)
    tokens = sums["_tokens"]
    assert abs(sums["ratio_mean"] / tokens - 1) < 1e-6 and sums["kl"] / tokens < 1e-8
    assert sums["routing_agreement"] / tokens == 1.0 and sums["mismatch_kl"] / tokens < 1e-8


def test_sampling_mask_renormalisation_removes_top_p_bias(tiny_moe, moe_samples):
    on = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature))
    off = copy.copy(on)
    off.cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, keep_sampling_mask=False)
    ref = [s.logprobs for s in moe_samples]
    gap_on = max(abs(a - b) for r, l in zip(ref, on.logprobs(moe_samples)) for a, b in zip(r, l))
    gap_off = np.mean([b - a for r, l in zip(ref, off.logprobs(moe_samples)) for a, b in zip(r, l)])
    assert gap_on < 1e-6
    assert gap_off < -1e-3, "without the mask, pi_theta of truncated sampling is systematically lower"


def test_replay_forces_recorded_experts_and_router_gets_gradient(learner, moe_samples):
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qm

    forced = [copy.deepcopy(s) for s in moe_samples[:2]]
    rng = np.random.default_rng(0)
    for s in forced:  # experts the router would not pick: a random pair per position and layer
        s.routed_experts = np.stack([rng.permutation(8)[:2] for _ in range(s.routed_experts.shape[0] * 2)]).reshape(
            s.routed_experts.shape).astype(np.int16)
    used = []
    orig = qm.Qwen3MoeExperts.forward
    qm.Qwen3MoeExperts.forward = lambda self, h, idx, w: (used.append(idx.clone()), orig(self, h, idx, w))[1]
    try:
        sums = learner.accumulate_grads(forced, step_totals(forced, 1, 8))
    finally:
        qm.Qwen3MoeExperts.forward = orig
    T = max(len(s.prompt_ids) + len(s.response_ids) - 1 for s in forced)
    for layer, idx in enumerate(used[:2]):  # the two MoE layers of the (only) micro-batch
        idx = idx.reshape(2, T, 2)
        for b, s in enumerate(forced):
            n = s.routed_experts.shape[0]
            assert torch.equal(idx[b, :n].cpu(), torch.as_tensor(s.routed_experts[:, layer], dtype=torch.long))
    assert sums["routing_agreement"] / sums["_tokens"] < 0.5  # the router disagreed, replay won
    grads = learner.full_grads()
    router = [n for n in grads if n.endswith("gate.weight")]
    assert router and all(grads[n].abs().sum() > 0 for n in router)
    learner.optimizer.zero_grad(set_to_none=True)


def test_agreement_is_logged_without_replay(tiny_moe, moe_samples):
    off = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, keep_routing=False))
    sums = off.accumulate_grads(moe_samples, step_totals(moe_samples, 1, 8))
    assert sums["routing_agreement"] / sums["_tokens"] == 1.0  # same weights: the router agrees everywhere


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume_is_exact(ray_cluster, tiny_moe, moe_samples, tmp_path):
    """1 process x 4 micro-batches == 2 processes x 2 micro-batches (gradients); training on a fixed batch
    lowers the loss; resuming from a checkpoint reproduces the next step's loss exactly."""
    samples = moe_samples[:16]
    base = dict(model=tiny_moe, temperature=SAMPLING.temperature, lr=3e-3, kl_coefs={"default": 0.05}, opsm_delta=1.0)
    one = LearnerGroup(LearnerConfig(micro_batch_size=4, **base), world_size=1)
    two = LearnerGroup(LearnerConfig(micro_batch_size=4, **base), world_size=2)
    try:
        one._all("accumulate_grads", _PerRank([samples]), step_totals(samples, 1, 4))
        g1 = one._all("full_grads")[0]
        shards = _PerRank([samples[r::2] for r in range(2)])
        two._all("accumulate_grads", shards, step_totals(samples, 2, 4))
        g2 = two._all("full_grads")[0]
        assert g1.keys() == g2.keys()
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7, msg=k)
        two._all("zero_grads")

        losses = [two.train_step(samples)["loss"] for _ in range(3)]
        assert losses[-1] < losses[0], losses
        two.save_checkpoint(str(tmp_path / "ckpt"), {"data_position": 7})
        expected = two.train_step(samples)
        assert two.load_checkpoint(str(tmp_path / "ckpt")) == {"data_position": 7}
        again = two.train_step(samples)
        assert again["loss"] == expected["loss"] and again["grad_norm"] == expected["grad_norm"]
    finally:
        one.shutdown()
        two.shutdown()
