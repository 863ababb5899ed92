"""The RL math of DeepSeek-V3.2 (arXiv 2512.02556, section 3.1 "Scaling GRPO") as registered pure functions.

Notation (DESIGN.md "The math"): sequence i of a group of G, token t, logp = log pi_theta (the learner),
logp_old = log pi_old (the **inference engine's sampling** log-prob, after temperature/top-p/top-k),
logp_ref = log pi_ref. Every tensor argument is `[B, L]` (B sequences, L response positions) unless a
shape comment says otherwise; `loss_mask` is 1 on response tokens that are trained and 0 on padding.

Registries (one per kind; unknown names fail with the supported list, see `rewards.registry.Registry`):
`ADVANTAGES`, `POLICY_LOSSES`, `KL_ESTIMATORS`, `AGGREGATIONS`, `SEQUENCE_MASKS`.

What is not covered here: the chunked log-prob and sampling-mask functions are in `rl.logprobs` and
re-exported below; routing replay is a model hook (it is not a formula on log-probs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rewards.registry import Registry
from rl.batch import to_device
from rl.logprobs import token_logprobs  # noqa: F401  (public API re-export)

ADVANTAGES: Registry = Registry("advantage estimator")
POLICY_LOSSES: Registry = Registry("policy loss")
KL_ESTIMATORS: Registry = Registry("kl estimator")
AGGREGATIONS: Registry = Registry("loss aggregation")
SEQUENCE_MASKS: Registry = Registry("sequence mask")


# --------------------------------------------------------------------------------------------- advantages
@dataclass(frozen=True)
class AdvantageStats:
    """Counts that the driver logs next to the advantages."""

    num_abstained: int  # rewards that were NaN (a scorer abstained) and so excluded
    num_degenerate_groups: int  # groups with < 2 valid members or all-equal rewards (all advantages 0)


def _group_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """valid mask, valid count, mean over valid members and a 'degenerate group' flag, per group."""
    valid = ~torch.isnan(rewards)  # [P, G]
    n = valid.sum(-1, keepdim=True)  # [P, 1]
    r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = r0.sum(-1, keepdim=True) / n.clamp(min=1)
    hi = torch.where(valid, rewards, torch.full_like(rewards, -math.inf)).amax(-1, keepdim=True)
    lo = torch.where(valid, rewards, torch.full_like(rewards, math.inf)).amin(-1, keepdim=True)
    # Exact comparison, not a tolerance: mean(0.1, 0.1, 0.1) - 0.1 is 1e-17, not 0, and must not count.
    degenerate = (n < 2) | (hi == lo)  # [P, 1]
    return valid, n, mean, degenerate


@ADVANTAGES.register("grpo")
def grpo_advantages(rewards: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """A_i = R_i - mean_j R_j over the valid (non-NaN) members of each group.

    `rewards` is `[num_prompts, G]`; NaN marks an abstained sample (its advantage is 0, it does not enter the
    mean). Groups with one valid member or all-equal rewards get all zeros.

    Deviation switch: V3.2 and Dr. GRPO drop the division by the group std (it up-weights near-solved and
    near-failed prompts); `std_normalize=True` restores DeepSeekMath's original form, dividing by
    (std + eps) with Bessel's correction, as verl and TRL do.
    """
    valid, n, mean, degenerate = _group_stats(rewards)
    adv = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    if std_normalize:
        var = (torch.where(valid, rewards - mean, torch.zeros_like(rewards)) ** 2).sum(-1, keepdim=True)
        std = (var / (n - 1).clamp(min=1)).sqrt()
        adv = adv / (std + eps)
    return torch.where(degenerate, torch.zeros_like(adv), adv)


@ADVANTAGES.register("grpo_std")
def grpo_std_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DeepSeekMath's GRPO: (R_i - mean) / (std + eps). Registered for ablations against V3.2's form."""
    return grpo_advantages(rewards, std_normalize=True, eps=eps)


def compute_advantages(name: str, rewards: torch.Tensor, **kwargs) -> tuple[torch.Tensor, AdvantageStats]:
    """Registered advantage by name, plus the abstention / degenerate-group counts for logging."""
    adv = ADVANTAGES.get(name)(rewards, **kwargs)
    _, _, _, degenerate = _group_stats(rewards)
    stats = AdvantageStats(int(torch.isnan(rewards).sum()), int(degenerate.sum()))
    return adv, stats


# ------------------------------------------------------------------------------------------ KL estimators
@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = log(pi_theta / pi_ref) (Schulman, "Approximating KL divergence"); unbiased only on-policy."""
    return logp - logp_ref


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * log(pi_theta / pi_ref)^2."""
    return 0.5 * (logp - logp_ref) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (DeepSeekMath / GRPO); ignores that samples came from pi_old."""
    log_r = logp_ref - logp
    return torch.exp(log_r) - log_r - 1


@KL_ESTIMATORS.register("unbiased_k3")
def kl_unbiased_k3(logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """V3.2's unbiased KL: (pi_theta / pi_old) * (pi_ref/pi_theta - log(pi_ref/pi_theta) - 1).

    The importance ratio pi_theta/pi_old is deliberately NOT detached: d/dlogp of this estimate is
    ratio * (logp - logp_ref), whose expectation under pi_old is the exact gradient of KL(pi_theta||pi_ref).
    Detaching it (as k3 in most frameworks effectively does) leaves a biased gradient when pi_old != pi_theta.
    """
    return torch.exp(logp - logp_old) * kl_k3(logp, logp_old, logp_ref)


def kl_penalty(name: str, logp: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate `[B, L]` with the registered estimator `name`."""
    return KL_ESTIMATORS.get(name)(logp, logp_old, logp_ref)


# -------------------------------------------------------------------------------------- sequence masks
def masked_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of x over mask: `[B, L] -> [B]`; 0 for a sequence with no masked-in token."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@SEQUENCE_MASKS.register("opsm")
def opsm_mask(
    advantages: torch.Tensor, logp_old: torch.Tensor, logp: torch.Tensor, loss_mask: torch.Tensor, delta: float
) -> torch.Tensor:
    """Off-policy sequence masking: M_i = 0 iff A_i < 0 and (1/|o_i|) sum_t log(pi_old/pi_theta) > delta.

    Returns a float `[B]` mask, decided per sequence from the token-mean of the log-ratio (a single wildly
    off-policy token in a long sequence does not mask it). Never masks A_i >= 0: those sequences are what
    the policy should learn from, however stale. Not differentiable (a comparison); computed on detached
    log-probs.
    """
    mask = loss_mask.to(logp.dtype)
    log_ratio = torch.where(mask > 0, logp_old - logp.detach(), torch.zeros_like(logp))
    drop = (advantages < 0) & (masked_token_mean(log_ratio, mask) > delta)
    return (~drop).to(logp.dtype)


# ------------------------------------------------------------------------------------------ aggregation
@dataclass(frozen=True)
class StepTotals:
    """The optimiser step's normalisers, counted over all its micro-batches and data-parallel ranks, so that
    summing the per-micro-batch losses gives exactly the step's loss whatever the split."""

    num_seqs: int  # sequences in the step
    num_tokens: int  # loss tokens in the step
    max_len: int  # positions of the longest row in the step (Dr. GRPO's constant L)

    @classmethod
    def of(cls, mask: torch.Tensor) -> "StepTotals":
        """The totals of one `[B, L]` loss mask taken as the whole step."""
        return cls(mask.shape[0], int(mask.sum()), mask.shape[1])


@AGGREGATIONS.register("seq_mean_token_mean")
def agg_seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    """(1/G) sum_i (1/|o_i|) sum_t l_{i,t}: the V3.2 / GRPO normalisation (G = the step's sequences)."""
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / max(totals.num_seqs, 1)


@AGGREGATIONS.register("token_mean")
def agg_token_mean(per_token: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    """sum_{i,t} l_{i,t} / sum_i |o_i| (DAPO), over the step's loss tokens."""
    return (per_token * mask).sum() / max(totals.num_tokens, 1)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def agg_seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    """Dr. GRPO: sum_{i,t} l_{i,t} / (B * L) with L the step's (padded) max length, a constant per step."""
    return (per_token * mask).sum() / max(totals.num_seqs * totals.max_len, 1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the loss tokens: a metric, so no gradient, and a 0-dim tensor on x's device rather than a
    float (reading it would wait for the forward: the learner reads a step's metrics once, after its backwards)."""
    m = mask.to(x.dtype)
    return (x.detach() * m).sum() / m.sum().clamp(min=1)


def mismatch_kl(logp: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Train-vs-engine mismatch: the k3 estimate of KL(pi_old || pi_theta) per loss token (samples come
    from pi_old). 0 when the learner reproduces the engine's sampling distribution exactly."""
    d = torch.where(mask > 0, logp.detach() - logp_old, torch.zeros_like(logp_old))
    return masked_mean(d.exp() - d - 1, mask)


# ------------------------------------------------------------------------------------------ policy loss
@dataclass(frozen=True)
class LossInputs:
    """What every policy loss gets (prime-rl's contract). Positions off `loss_mask` may hold any value."""

    logp: torch.Tensor  # [B, L] log pi_theta of the sampled tokens (differentiable)
    loss_mask: torch.Tensor  # [B, L] 1 on trained tokens
    totals: StepTotals  # the step's normalisers (this batch may be one micro-batch of it)
    logp_old: torch.Tensor | None = None  # [B, L] the engine's sampling log-probs (losses with uses_engine_samples)
    logp_ref: torch.Tensor | None = None  # [B, L] reference log-probs; None when no sequence has beta != 0
    advantages: torch.Tensor | None = None  # [B]
    kl_coef: torch.Tensor | float = 0.0  # beta, a float or per sequence [B] (per-domain betas; on the host, so that
    # the loss can tell whether any is non-zero without waiting for the device)


@dataclass(frozen=True)
class LossOutputs:
    loss: torch.Tensor  # scalar: this batch's share of the step's loss
    metrics: dict[str, torch.Tensor | float]  # means over this batch's loss tokens (0-dim tensors: see masked_mean)


@dataclass(frozen=True)
class LossConfig:
    """The algorithm's settings; each loss reads the fields it uses."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher; None = clip_eps
    kl_estimator: str = "unbiased_k3"
    opsm_delta: float | None = None  # off-policy sequence masking threshold; None = off
    aggregation: str = "seq_mean_token_mean"


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss and what it needs from the learner."""

    fn: object  # (LossInputs, LossConfig) -> LossOutputs
    needs_reference: bool  # the reference model's log-probs (for sequences whose beta != 0)
    uses_engine_samples: bool  # trains on the engine's samples: pi_old, captures (routing, kept sets), temperature


def register_loss(name: str, *, needs_reference: bool, uses_engine_samples: bool):
    def deco(fn):
        POLICY_LOSSES.register(name)(PolicyLoss(fn, needs_reference, uses_engine_samples))
        return fn

    return deco


@register_loss("grpo", needs_reference=True, uses_engine_samples=True)
def grpo_loss(x: LossInputs, cfg: LossConfig = LossConfig()) -> LossOutputs:
    """V3.2's GRPO objective, returned as a loss to minimise (its negation):

        L = -(1/G) sum_i (1/|o_i|) sum_t [ M_i * min(r A_i, clip(r, 1-eps, 1+eps_high) A_i) - beta * KL_t ]

    r = exp(logp - logp_old) with pi_old the engine's sampling probability; M_i from `opsm_mask` when
    `opsm_delta` is set (it multiplies the surrogate only, never the KL term); KL_t from `kl_estimator`.
    `clip_eps_high` (DAPO's clip-higher) defaults to `clip_eps`. The aggregation normalises by the step's
    totals (see AGGREGATIONS) so micro-batches and data-parallel ranks sum to the step loss.

    Padding positions may hold any value, even -inf: they are replaced before the exponentials so that
    they contribute neither value nor NaN gradient. Metrics over loss tokens: clip_frac, kl (mean per-token
    estimate), opsm_masked_frac (of sequences), ratio_mean, mismatch_kl (`mismatch_kl`).
    """
    logp, logp_old, logp_ref, advantages = x.logp, x.logp_old, x.logp_ref, x.advantages
    mask = x.loss_mask.to(logp.dtype)
    on = mask > 0
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(on, logp - logp_old, zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    hi = cfg.clip_eps if cfg.clip_eps_high is None else cfg.clip_eps_high
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - cfg.clip_eps, 1 + hi) * adv)  # [B, L]

    seq_mask = torch.ones_like(advantages, dtype=logp.dtype)
    if cfg.opsm_delta is not None:
        seq_mask = opsm_mask(advantages, logp_old, logp, mask, cfg.opsm_delta)
    per_token = -surr * seq_mask[:, None]

    kl = zero
    beta = torch.as_tensor(x.kl_coef, dtype=logp.dtype)
    if bool((beta != 0).any()):
        beta = to_device(beta, logp.device)
        if logp_ref is None:
            raise ValueError("grpo_loss: kl_coef != 0 needs logp_ref (the reference model's log-probs)")
        safe = lambda t: torch.where(on, t, logp.detach())  # noqa: E731  padding -> KL 0, ratio 1
        kl = torch.where(on, kl_penalty(cfg.kl_estimator, safe(logp), safe(logp_old), safe(logp_ref)), zero)
        per_token = per_token + (beta[:, None] if beta.dim() == 1 else beta) * kl

    loss = AGGREGATIONS.get(cfg.aggregation)(per_token, mask, x.totals)

    clipped = ((adv > 0) & (ratio > 1 + hi)) | ((adv < 0) & (ratio < 1 - cfg.clip_eps))
    metrics = {
        "clip_frac": masked_mean(clipped.to(logp.dtype), mask),
        "kl": masked_mean(kl, mask),
        "opsm_masked_frac": (1 - seq_mask.mean()) if seq_mask.numel() else 0.0,
        "ratio_mean": masked_mean(ratio, mask),
        "mismatch_kl": mismatch_kl(logp, logp_old, mask),
    }
    return LossOutputs(loss, metrics)


@register_loss("sft", needs_reference=False, uses_engine_samples=False)
def sft_loss(x: LossInputs, cfg: LossConfig = LossConfig()) -> LossOutputs:
    """Token-mean cross-entropy on response tokens over the step's tokens (specialist distillation and SFT
    from data). `cfg` is unused: the SFT objective has no settings."""
    mask = x.loss_mask.to(x.logp.dtype)
    nll = -torch.where(mask > 0, x.logp, torch.zeros_like(x.logp))
    return LossOutputs(agg_token_mean(nll, mask, x.totals), {"nll": masked_mean(nll, mask)})
