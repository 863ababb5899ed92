"""Golden values, loop references and gradient properties for rl.algos (DESIGN.md "The math")."""
from __future__ import annotations

import math

import pytest
import torch

from rl import algos
from rl.algos import compute_advantages, grpo_advantages, grpo_loss, kl_penalty, opsm_mask

NAN = float("nan")



def _grpo(logp, logp_old, logp_ref, adv, mask, *, kl_coef=0.0, totals=None, **cfg):
    """grpo_loss through the loss contract; `totals` defaults to this batch as the whole step."""
    x = algos.LossInputs(logp, mask, totals or algos.StepTotals.of(mask), logp_old=logp_old, logp_ref=logp_ref,
                         advantages=adv, kl_coef=kl_coef)
    out = grpo_loss(x, algos.LossConfig(**cfg))
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in out.metrics.values() if not isinstance(v, float))
    return out.loss, {k: float(v) for k, v in out.metrics.items()}  # 0-dim tensors: the learner reads them once a step

# ----------------------------------------------------------------------------------------- advantages
def test_advantages_golden():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [NAN, 1.0, 0.0, NAN], [NAN, 2.0, NAN, NAN]])
    expect = torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.0] * 4, [0.0, 0.5, -0.5, 0.0], [0.0] * 4])
    assert torch.equal(grpo_advantages(r), expect)
    # DeepSeekMath form: divide by the Bessel-corrected std (sqrt(1/3) for [1, 0, 1, 0], 1/sqrt(2) for [1, 0]).
    std = grpo_advantages(r, std_normalize=True, eps=0.0)
    assert std[0].tolist() == pytest.approx([0.5 / math.sqrt(1 / 3), -0.5 / math.sqrt(1 / 3)] * 2)
    assert std[2].tolist() == pytest.approx([0.0, 0.5 * math.sqrt(2), -0.5 * math.sqrt(2), 0.0])
    assert torch.equal(std[1], torch.zeros(4)) and torch.equal(std[3], torch.zeros(4))


def test_all_equal_group_is_exactly_zero():
    # mean(0.1, 0.1, 0.1) != 0.1 in floating point; the advantage must still be exactly 0.
    r = torch.tensor([[0.1, 0.1, 0.1]], dtype=torch.float64)
    assert torch.equal(grpo_advantages(r), torch.zeros(1, 3, dtype=torch.float64))
    assert torch.equal(grpo_advantages(r, std_normalize=True), torch.zeros(1, 3, dtype=torch.float64))


def _advantages_loop(rewards: torch.Tensor, std_normalize: bool, eps: float) -> torch.Tensor:
    out = torch.zeros_like(rewards)
    for p, row in enumerate(rewards.tolist()):
        valid = [(g, x) for g, x in enumerate(row) if not math.isnan(x)]
        vals = [x for _, x in valid]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1))
        for g, x in valid:
            out[p, g] = (x - mean) / (std + eps) if std_normalize else x - mean
    return out


@pytest.mark.parametrize("std_normalize", [False, True])
def test_advantages_match_loop(std_normalize):
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (50, 8), generator=g).double() / 2
    r[torch.rand(50, 8, generator=g) < 0.2] = NAN
    expect = _advantages_loop(r, std_normalize, 1e-6)
    torch.testing.assert_close(grpo_advantages(r, std_normalize=std_normalize), expect, rtol=1e-12, atol=1e-12)


def test_abstained_and_degenerate_are_counted():
    r = torch.tensor([[1.0, NAN, 0.0], [NAN, NAN, 1.0], [2.0, 2.0, 2.0]])
    adv, stats = compute_advantages("grpo", r)
    assert stats.num_abstained == 3 and stats.num_degenerate_groups == 2
    assert adv[0].tolist() == [0.5, 0.0, -0.5]


# ----------------------------------------------------------------------------------------------- KL
LOGP, LOGP_OLD, LOGP_REF = math.log(0.5), math.log(0.25), math.log(0.4)


@pytest.mark.parametrize(
    "name,expect",
    [
        ("k1", math.log(0.5 / 0.4)),  # 0.223144
        ("k2", 0.5 * math.log(0.5 / 0.4) ** 2),  # 0.024897
        ("k3", 0.8 - math.log(0.8) - 1),  # 0.023144
        ("unbiased_k3", 2.0 * (0.8 - math.log(0.8) - 1)),  # ratio pi/pi_old = 2
    ],
)
def test_kl_golden(name, expect):
    t = lambda x: torch.tensor([[x]], dtype=torch.float64)  # noqa: E731
    assert kl_penalty(name, t(LOGP), t(LOGP_OLD), t(LOGP_REF)).item() == pytest.approx(expect, rel=1e-12)


def test_unbiased_k3_gradient_is_exact_reverse_kl_gradient():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    logp_old = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    logp_ref = logp.detach() + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(kl_penalty("unbiased_k3", logp, logp_old, logp_ref).sum(), logp)
    ratio = torch.exp(logp.detach() - logp_old)
    torch.testing.assert_close(grad, ratio * (logp.detach() - logp_ref), rtol=1e-12, atol=1e-12)
    # The detached-ratio version (what "k3 times a constant weight" gives) has a different gradient.
    detached = torch.exp(logp - logp_old).detach() * kl_penalty("k3", logp, logp_old, logp_ref)
    (grad_detached,) = torch.autograd.grad(detached.sum(), logp)
    assert (grad - grad_detached).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- OPSM
def test_opsm_is_per_sequence_and_spares_positive_advantages():
    L = 10
    mask = torch.ones(3, L)
    logp = torch.zeros(3, L)
    logp_old = torch.zeros(3, L)
    logp_old[0, 0] = 5.0  # one wildly off-policy token, sequence mean 0.5
    logp_old[1] = 2.0  # every token off by 2: mean 2
    logp_old[2] = 2.0  # same drift but positive advantage
    adv = torch.tensor([-1.0, -1.0, 1.0])
    assert opsm_mask(adv, logp_old, logp, mask, delta=1.0).tolist() == [1.0, 0.0, 1.0]
    assert opsm_mask(adv, logp_old, logp, mask, delta=0.4).tolist() == [0.0, 0.0, 1.0]
    # Only loss tokens count: masking the drifting tokens out brings the mean back under delta.
    m2 = mask.clone()
    m2[1, :8] = 0
    logp_old2 = logp_old.clone()
    logp_old2[1, 8:] = 0.0
    assert opsm_mask(adv, logp_old2, logp, m2, delta=1.0)[1] == 1.0


def test_opsm_masks_surrogate_not_kl():
    B, L, beta = 2, 4, 0.1
    logp = torch.full((B, L), -1.0, dtype=torch.float64, requires_grad=True)
    logp_old = torch.full((B, L), 1.0, dtype=torch.float64)  # log(pi_old/pi) = 2 > delta
    logp_ref = torch.full((B, L), -1.5, dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.float64)
    kw = dict(kl_coef=beta, opsm_delta=0.5, clip_eps=10.0)  # wide clip: keep the surrogate gradient alive
    loss, metrics = _grpo(logp, logp_old, logp_ref, adv, mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    assert metrics["opsm_masked_frac"] == 0.5
    # Sequence 0 is masked: its gradient is the KL term's alone, ratio * (logp - logp_ref) * beta / (|o| B).
    ratio = math.exp(-2.0)
    kl_grad = beta * ratio * (-1.0 + 1.5) / (L * B)
    torch.testing.assert_close(grad[0], torch.full((L,), kl_grad, dtype=torch.float64))
    # Sequence 1 (A > 0) keeps its surrogate: -A * ratio / (|o| B) plus the same KL gradient.
    torch.testing.assert_close(grad[1], torch.full((L,), -ratio / (L * B) + kl_grad, dtype=torch.float64))


# -------------------------------------------------------------------------------------------- loss
def _grpo_loss_loop(logp, logp_old, logp_ref, adv, mask, clip_lo, clip_hi, beta, delta):
    """Token-by-token transcription of DESIGN.md's objective, with the unbiased KL."""
    B, L = logp.shape
    total = 0.0
    for i in range(B):
        toks = [t for t in range(L) if mask[i, t] > 0]
        n = max(len(toks), 1)
        drift = sum(logp_old[i, t] - logp[i, t].detach() for t in toks) / n
        m = 0.0 if (adv[i] < 0 and delta is not None and drift > delta) else 1.0
        seq = 0.0
        for t in toks:
            r = torch.exp(logp[i, t] - logp_old[i, t])
            surr = torch.minimum(r * adv[i], torch.clamp(r, 1 - clip_lo, 1 + clip_hi) * adv[i])
            lr = logp_ref[i, t] - logp[i, t]
            kl = r * (torch.exp(lr) - lr - 1)
            seq = seq + m * surr - beta * kl
        total = total + seq / n
    return -total / B


@pytest.mark.parametrize("delta", [None, 0.05])
def test_grpo_loss_matches_loop(delta):
    g = torch.Generator().manual_seed(2)
    B, L = 6, 7
    logp = (-torch.rand(B, L, generator=g, dtype=torch.float64) * 3).requires_grad_()
    logp_old = logp.detach() + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    logp_ref = logp.detach() + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, L, generator=g) < 0.8).double()
    mask[0] = 0  # a fully masked sequence
    logp_old[1::2] += 0.2  # every other sequence drifted off-policy
    kw = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.05, opsm_delta=delta)
    loss, metrics = _grpo(logp, logp_old, logp_ref, adv, mask, **kw)
    ref = _grpo_loss_loop(logp, logp_old, logp_ref, adv, mask, 0.2, 0.28, 0.05, delta)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(loss, logp)
    (g2,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    if delta is not None:
        assert 0 < metrics["opsm_masked_frac"] < 1


def test_step0_identity_is_plain_policy_gradient():
    B, L = 3, 5
    logp = torch.log(torch.rand(B, L, dtype=torch.float64)).requires_grad_()
    same = logp.detach().clone()
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    mask = torch.ones(B, L, dtype=torch.float64)
    mask[2, 3:] = 0
    loss, m = _grpo(logp, same, same, adv, mask, kl_coef=0.1, opsm_delta=0.0)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-12) and m["kl"] == 0.0
    assert m["clip_frac"] == 0.0 and m["opsm_masked_frac"] == 0.0
    (grad,) = torch.autograd.grad(loss, logp)
    n_tok = mask.sum(-1, keepdim=True)
    torch.testing.assert_close(grad, -adv[:, None] * mask / n_tok / B)


def test_padding_with_inf_and_empty_sequences_are_finite():
    logp = torch.tensor([[-1.0, -float("inf")], [-float("inf"), -float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss, metrics = _grpo(logp, old, old, torch.tensor([1.0, -1.0]), mask, kl_coef=0.1, opsm_delta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[1].abs().sum() == 0 and logp.grad[0, 1] == 0


def test_clip_fraction_golden():
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5, 1.1]])) + math.log(0.1)  # ratios 1.5, 1.0, 0.5, 1.1
    old = torch.full((1, 4), math.log(0.1))
    _, m = _grpo(logp, old, None, torch.tensor([1.0]), torch.ones(1, 4), clip_eps=0.2)
    assert m["clip_frac"] == 0.25  # only 1.5 is clipped for A > 0 (0.5 is below 1-eps but unclipped by min)
    _, m = _grpo(logp, old, None, torch.tensor([-1.0]), torch.ones(1, 4), clip_eps=0.2)
    assert m["clip_frac"] == 0.25  # only 0.5 for A < 0


@pytest.mark.parametrize("aggregation", algos.AGGREGATIONS.names())
def test_micro_batches_sum_to_step_loss(aggregation):
    g = torch.Generator().manual_seed(3)
    B, L = 8, 6
    logp = -torch.rand(B, L, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, L, generator=g) < 0.7).double()
    full, _ = _grpo(logp, old, None, adv, mask, aggregation=aggregation)
    totals = algos.StepTotals(B, int(mask.sum()), L)
    parts = [_grpo(logp[s], old[s], None, adv[s], mask[s], aggregation=aggregation, totals=totals)[0]
             for s in (slice(0, 3), slice(3, 5), slice(5, 8))]
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=1e-12)


def test_sft_loss_is_token_mean_nll():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = algos.POLICY_LOSSES.get("sft").fn(algos.LossInputs(logp, mask, algos.StepTotals.of(mask)))
    loss, m = out.loss, out.metrics
    assert loss.item() == pytest.approx(2.0) and float(m["nll"]) == pytest.approx(2.0)


# -------------------------------------------------------------------------------------- registries
def test_unknown_names_list_supported():
    t = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=r"Unsupported kl estimator 'k4'. Supported: \['k1', 'k2', 'k3', 'unbiased_k3'\]"):
        kl_penalty("k4", t, t, t)
    with pytest.raises(ValueError, match=r"Unsupported loss aggregation 'nope'. Supported: \["):
        _grpo(t, t, None, torch.zeros(1), t, aggregation="nope")
    with pytest.raises(ValueError, match=r"Unsupported advantage estimator 'ppo'"):
        compute_advantages("ppo", t)


def test_duplicate_registration_fails():
    with pytest.raises(ValueError, match="kl estimator 'k1' is already registered"):
        algos.KL_ESTIMATORS.register("k1")(lambda *a: None)


def test_per_sequence_beta_equals_separate_calls():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    ref = logp + 0.1 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(4, generator=g, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
    beta = torch.tensor([0.0, 0.0, 0.1, 0.1], dtype=torch.float64)  # e.g. math (beta 0) and chat (beta 0.1)
    both, _ = _grpo(logp, old, ref, adv, mask, kl_coef=beta)
    a, _ = _grpo(logp[:2], old[:2], ref[:2], adv[:2], mask[:2], kl_coef=0.0, totals=algos.StepTotals(4, 20, 5))
    b, _ = _grpo(logp[2:], old[2:], ref[2:], adv[2:], mask[2:], kl_coef=0.1, totals=algos.StepTotals(4, 20, 5))
    torch.testing.assert_close(both, a + b, rtol=1e-12, atol=1e-12)
