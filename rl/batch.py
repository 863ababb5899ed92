"""Samples -> padded training tensors. A pure function, so the alignment can be tested by hand.

Position t of a row is the model input `(prompt + response)[t]`, predicting `(prompt + response)[t + 1]`;
the row has `P + R - 1` positions, exactly the positions the engine ran (and routed). Response token j is
predicted at position `P - 1 + j`; only those positions carry a loss (times the Sample's own loss_mask,
which is 0 for tool-result tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.sample import Sample


@dataclass(frozen=True)
class TrainBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T] the next token at every position
    loss_mask: torch.Tensor  # [B, T] float, 1 on trained response positions
    logp_old: torch.Tensor  # [B, T] engine sampling log-probs (0 off the loss mask)
    advantages: torch.Tensor  # [B]
    kl_coef: torch.Tensor  # [B] beta of each sample's domain
    routed_experts: torch.Tensor | None  # [B, T, layers, k] long, or None
    kept_ids: torch.Tensor | None  # [B, T, K] long padded with -1, or None


def collate(samples: list[Sample], kl_coefs: dict[str, float] | None = None, pad_id: int = 0,
            use_sampling_mask: bool = True) -> TrainBatch:
    """Pad and align `samples` (see module docstring). Routing is included whenever every sample has it
    (the learner decides whether to replay it); sampling masks only with `use_sampling_mask`."""
    B = len(samples)
    T = max(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T))
    logp_old = torch.zeros((B, T))
    have_routing = all(s.routed_experts is not None for s in samples)
    have_masks = [s.kept_offsets is not None for s in samples]
    if use_sampling_mask and any(have_masks) and not all(have_masks):
        raise ValueError("collate: some samples carry sampling masks and some do not; sampling settings must agree")
    have_masks = use_sampling_mask and all(have_masks)
    routed = kept = None
    if have_routing:
        layers, k = samples[0].routed_experts.shape[1:]
        routed = torch.arange(k).expand(B, T, layers, k).clone()  # padding: any valid ids
    if have_masks:
        K = max(int((s.kept_offsets[1:] - s.kept_offsets[:-1]).max()) for s in samples if len(s.response_ids))
        kept = torch.full((B, T, K), -1, dtype=torch.long)
    for b, s in enumerate(samples):
        seq = list(s.prompt_ids) + list(s.response_ids)
        n, P, R = len(seq) - 1, len(s.prompt_ids), len(s.response_ids)
        input_ids[b, :n] = torch.tensor(seq[:-1])
        targets[b, :n] = torch.tensor(seq[1:])
        attn[b, :n] = 1
        loss_mask[b, P - 1 : P - 1 + R] = torch.tensor(s.loss_mask, dtype=torch.float)
        logp_old[b, P - 1 : P - 1 + R] = torch.tensor(s.logprobs, dtype=torch.float)
        if have_routing:
            routed[b, :n] = torch.as_tensor(s.routed_experts, dtype=torch.long)
        if have_masks:
            # Positions without a kept set (prompt, padding) get {target}: log-prob 0, gradient 0.
            kept[b, :, 0] = targets[b]
            for j in range(R):
                ids = torch.as_tensor(s.kept_ids[s.kept_offsets[j] : s.kept_offsets[j + 1]], dtype=torch.long)
                kept[b, P - 1 + j, : len(ids)] = ids
                kept[b, P - 1 + j, len(ids) :] = -1
    betas = torch.tensor([float((kl_coefs or {}).get(s.domain, 0.0)) for s in samples])
    adv = torch.tensor([float(s.advantage) for s in samples])
    return TrainBatch(input_ids, attn, targets, loss_mask, logp_old, adv, betas, routed, kept)


def split(batch: TrainBatch, size: int) -> list[TrainBatch]:
    """Micro-batches of `size` rows (the last may be smaller); padding columns are kept."""
    B = batch.input_ids.shape[0]
    out = []
    for s in range(0, B, size):
        sl = slice(s, s + size)
        out.append(TrainBatch(*(None if v is None else v[sl] for v in (
            batch.input_ids, batch.attention_mask, batch.targets, batch.loss_mask, batch.logp_old,
            batch.advantages, batch.kl_coef, batch.routed_experts, batch.kept_ids))))
    return out
