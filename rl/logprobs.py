"""Per-token log-probs from hidden states without materialising `[B, L, V]` logits.

`token_logprobs` is a custom autograd function: the forward pass computes logits one chunk of tokens at
a time and keeps only the `[N]` log-probs; the backward pass recomputes each chunk's logits and turns them
into gradients for the hidden states and the LM head (like Liger's fused linear cross-entropy). Peak extra
memory is O(chunk_size * V) instead of O(N * V) in both passes. The cost is one extra head matmul in
backward (the recompute).

Keep sampling mask (V3.2): when `kept_ids` is given, pi_theta is renormalised over each position's kept set
S_t (logits outside S_t = -inf), matching the engine's processed sampling distribution. A sampled token
outside its kept set gets log-prob -inf (the engine could not have sampled it) and no gradient.
"""
from __future__ import annotations

import torch


def csr_to_padded(offsets: torch.Tensor, ids: torch.Tensor, pad: int = -1) -> torch.Tensor:
    """Kept sets in CSR form (`offsets [N+1]`, `ids [nnz]`) -> `[N, K_max]` padded with `pad`."""
    counts = offsets[1:] - offsets[:-1]  # [N]
    n, k = counts.numel(), int(counts.max()) if counts.numel() else 0
    out = torch.full((n, k), pad, dtype=torch.long)
    col = torch.arange(ids.numel()) - torch.repeat_interleave(offsets[:-1], counts)
    out[torch.repeat_interleave(torch.arange(n), counts), col] = ids.long()
    return out


def _as_padded(kept_ids, like: torch.Tensor) -> torch.Tensor | None:
    """Accept None, a padded `[..., K]` tensor, or a CSR `(offsets, ids)` pair; return `[N, K]` or None."""
    if kept_ids is None:
        return None
    if isinstance(kept_ids, (tuple, list)):
        kept_ids = csr_to_padded(*kept_ids)
    return kept_ids.reshape(like.numel(), -1).long()


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[n, V]` logits in at least fp32 (bf16 models: matmul in bf16 like the HF head, softmax in fp32)."""
    logits = h @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits / temperature if temperature != 1.0 else logits


def _kept_logits(logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`[n, K]` logits of the kept ids, -inf on padding."""
    return logits.gather(-1, kept.clamp(min=0)).masked_fill(kept < 0, float("-inf"))


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward keeps only `[N]` log-probs and the `[N]` log-normalisers; backward recomputes the logits of
    one chunk at a time and builds the chunk's gradient in place in that same buffer."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, kept, chunk_size, temperature, want_entropy):
        n = token_ids.numel()
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = hidden.new_empty(n, dtype=dtype)
        lse_all = hidden.new_empty(n, dtype=dtype)
        ent = hidden.new_zeros(n if want_entropy else 0, dtype=dtype)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = _chunk_logits(hidden[s:e], weight, temperature)  # [n, V]
            k = None if kept is None else kept[s:e]
            support = logits if k is None else _kept_logits(logits, k)  # [n, V] or [n, K]
            lse = torch.logsumexp(support, -1)
            lse_all[s:e] = lse
            out[s:e] = logits.gather(-1, token_ids[s:e, None]).squeeze(-1) - lse
            if k is not None:  # a token outside its kept set could not have been sampled
                out[s:e].masked_fill_(~(k == token_ids[s:e, None]).any(-1), float("-inf"))
            if want_entropy:  # H = lse - sum_v p_v * logit_v, for logging only
                p = (support - lse[:, None]).exp_()
                ent[s:e] = lse - (p * support.nan_to_num(neginf=0.0)).sum(-1)
        ctx.save_for_backward(hidden, weight, token_ids, kept, lse_all)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, _grad_ent):
        hidden, weight, token_ids, kept, lse_all = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
        n = token_ids.numel()
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e]
            logits = _chunk_logits(h, weight, temperature)
            lse = lse_all[s:e, None]
            g = grad_out[s:e].to(logits.dtype)
            ids = token_ids[s:e, None]
            if kept is None:
                grad_logits = logits.sub_(lse).exp_()  # p, in the logits buffer
            else:
                k = kept[s:e]
                g = g.masked_fill(~(k == ids).any(-1), 0.0)
                pk = (_kept_logits(logits, k) - lse).exp_()
                grad_logits = logits.zero_().scatter_add_(-1, k.clamp(min=0), pk)
            # d logp_tok / d logits = onehot(tok) - p ; then the 1/temperature of the logits.
            grad_logits.mul_(-g[:, None]).scatter_add_(-1, ids, g[:, None])
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_h[s:e] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.T @ h).to(grad_w.dtype)  # bf16 matmul, fp32 accumulation
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,  # [B, L, H] (or [N, H]) final hidden states, after the final norm
    lm_head_weight: torch.Tensor,  # [V, H]
    token_ids: torch.Tensor,  # [B, L] (or [N]) the tokens whose log-prob is wanted (already shifted)
    chunk_size: int = 256,
    *,
    kept_ids=None,  # optional [B, L, K] padded with -1, or CSR (offsets, ids) over the B*L positions
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log softmax(hidden @ W^T / temperature)[token] per position, chunked over positions.

    Equals the unchunked computation (up to float summation order); gradients flow to `hidden` and
    `lm_head_weight`. With `kept_ids` the softmax is over the kept set only (see module docstring).
    Returns `[B, L]` log-probs (fp32, or fp64 for fp64 inputs), and the per-position entropy (no gradient) if `return_entropy`.
    """
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    shape = token_ids.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1).long()
    if h.shape[0] != ids.numel():
        raise ValueError(f"token_logprobs: hidden has {h.shape[0]} positions but token_ids has {ids.numel()}")
    kept = _as_padded(kept_ids, ids)
    logp, ent = _ChunkedTokenLogprobs.apply(
        h, lm_head_weight, ids, kept, chunk_size, float(temperature), return_entropy
    )
    return (logp.reshape(shape), ent.reshape(shape)) if return_entropy else logp.reshape(shape)


def sampling_mask_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, kept_ids) -> torch.Tensor:
    """log-probs of `token_ids` under softmax(logits) renormalised over each position's kept set.

    `logits` `[..., V]`, `token_ids` `[...]`, `kept_ids` `[..., K]` padded with -1 or CSR `(offsets, ids)`
    (vLLM's layout) over the flattened positions. Equivalent to setting logits outside the set to -inf;
    a token outside its set gets -inf. For long sequences use `token_logprobs(..., kept_ids=...)`, which
    does the same from hidden states in chunks.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    ids = token_ids.reshape(-1, 1).long()
    kept = _as_padded(kept_ids, ids)
    lse = torch.logsumexp(_kept_logits(flat, kept), -1)
    out = flat.gather(-1, ids).squeeze(-1) - lse
    in_set = (kept == ids).any(-1)
    return torch.where(in_set, out, torch.full_like(out, float("-inf"))).reshape(token_ids.shape)
