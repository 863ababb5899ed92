"""DSA's two training stages (V3.2 section 2.1.1) as registered losses on the tensors `rollout.dsa` keeps.

- `dense_warmup`: the main model is frozen; the indexer learns to match the main attention. Target p_t is
  the main attention distribution summed over heads and L1-normalised; loss = sum_t KL(p_t || softmax(I_t))
  over the causal keys.
- `sparse`: the indexer is trained with the same KL restricted to its selected set S_t (both
  distributions renormalised over S_t), with its input detached from the main model's graph; the main
  model trains with its normal loss, the two gradients never mixing.

Both average over query positions (`mask` selects them) and layers. Deviation: V3.2 sums the KL over
tokens; we average so the coefficient does not scale with sequence length.
"""
from __future__ import annotations

import torch

from rewards.registry import Registry

DSA_LOSSES: Registry = Registry("dsa loss")


def _kl(p: torch.Tensor, logits: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits over support)) per position; p is 0 off the support. `[B, Lq]`."""
    logq = torch.log_softmax(logits.masked_fill(~support, float("-inf")), -1)
    logp = torch.log(p.clamp(min=1e-30))
    return torch.where(support & (p > 0), p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _mean(per_pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp(min=1)


def _target(state: dict, support: torch.Tensor) -> torch.Tensor:
    p = state["attn"].detach().float().sum(1) * support  # [B, Lq, S], summed over heads
    return p / p.sum(-1, keepdim=True).clamp(min=1e-30)


@DSA_LOSSES.register("dense_warmup")
def dense_warmup_loss(states: list[dict], mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.stack([_mean(_kl(_target(s, s["allowed"]), s["index"], s["allowed"]), mask) for s in states]).mean()


@DSA_LOSSES.register("sparse")
def sparse_loss(states: list[dict], mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.stack([_mean(_kl(_target(s, s["selected"]), s["index"], s["selected"]), mask) for s in states]).mean()


def layer_states(model) -> list[dict]:
    from rollout.dsa import attention_modules

    states = [a._dsa_state for a in attention_modules(model)]
    if any(s is None for s in states):
        raise RuntimeError("DSA loss: no attention state kept; call rollout.dsa.keep_for_loss(model) first")
    return states
