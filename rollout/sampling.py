"""The sampler's logit processing, written to match vLLM's (`apply_top_k_top_p` in its sampler):
temperature first, then top-k, then top-p on the sorted distribution, always keeping the top token.

The processed distribution is what tokens are drawn from, so its log-probs are pi_old (vLLM's
`processed_logprobs`) and its support is the sampling mask S_t of V3.2's "Keep Sampling Mask".
"""
from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`[B, V]` logits -> processed logits, -inf outside the kept set. temperature 0 = greedy (one token)."""
    logits = logits.float()
    if temperature == 0.0:
        keep = logits.argmax(-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, keep, logits.gather(-1, keep))
    logits = logits / temperature
    if top_k <= 0 and top_p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    if top_k > 0:
        kth = sorted_logits[:, -min(top_k, logits.shape[-1])].unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p < 1.0:
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def truncates(temperature: float, top_k: int, top_p: float) -> bool:
    """Whether sampling drops tokens (so a sampling mask must be recorded)."""
    return temperature == 0.0 or top_k > 0 or top_p < 1.0
