"""Per-token log-probs from hidden states without materialising `[B, L, V]` logits.

`token_logprobs` is a custom autograd function: the forward pass computes logits one chunk of tokens at
a time and keeps only the `[N]` log-probs; the backward pass recomputes each chunk's logits and turns them
into gradients for the hidden states and the LM head (like Liger's fused linear cross-entropy). Peak extra
memory is O(chunk_size * V) instead of O(N * V) in both passes. The cost is one extra head matmul in
backward (the recompute).

Keep sampling mask (V3.2): when `kept_ids` is given, pi_theta is renormalised over each position's kept set
S_t (logits outside S_t = -inf), matching the engine's processed sampling distribution. A sampled token
outside its kept set gets log-prob -inf (the engine could not have sampled it) and no gradient.

`compiled=True` (the learner's `trainer.compile`): each chunk's softmax statistics and its logit gradient
are one torch.compile'd pass each over the head matmul's own (bf16) output, upcast in registers, instead of
eager ops that each write a `[n, V]` fp32 tensor (the upcast copy, logsumexp's, the entropy's probabilities,
the gradient's). Same formulas, same dtypes; only the order of float summation differs. Chunks whose kept
sets are id-encoded (`[n, K]` supports) keep the eager code: their support is small.
"""
from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[n, V]` logits in at least fp32 (bf16 models: matmul in bf16 like the HF head, softmax in fp32)."""
    logits = _upcast(h @ weight.T)
    return logits / temperature if temperature != 1.0 else logits


def _kept_support(logits: torch.Tensor, ids: torch.Tensor, sets):
    """The chunk's renormalisation support, from `sets = kept.chunk(s, e, device)`. Small sets (every row
    id-encoded): the `[n, K]` logits of the kept ids (-inf on padding) and the ids; the `[n, V]` logits are left
    alone. A chunk with a bitmap row: the `[n, V]` logits with everything outside the sets at -inf, in place.
    Returns (support logits, padded ids or None, in_set [n]: whether each token is in its set)."""
    mode, k, has = sets
    if mode == "mask":
        logits.masked_fill_(~k, float("-inf"))
        return logits, None, k.gather(-1, ids).squeeze(-1)
    k = k.clone()
    k[~has, 0] = ids[~has, 0]  # positions without a set (prompt, padding): {target}, log-prob 0, no gradient
    sel = logits.gather(-1, k.clamp(min=0)).masked_fill(k < 0, float("-inf"))
    return sel, k, (k == ids).any(-1)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place. Every chunk adds a `[V, H]` product to the weight gradient, so a temporary
    plus an add would move ~3x the gradient's bytes per chunk; bf16 inputs on CUDA accumulate straight into
    the fp32 gradient in cuBLAS (`out_dtype`), fp32 inputs use `addmm_`."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _has_out_dtype_addmm():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


_OUT_DTYPE_ADDMM: list[bool] = []


def _has_out_dtype_addmm() -> bool:
    """Whether this torch has CUDA's bf16 -> fp32 `addmm(..., out_dtype=)` (torch >= 2.8; 2.8-2.9 want a bf16
    accumulator and raise here), checked once on a small product against the upcast one: a transposed operand
    as in the backward, and an accumulator whose bf16 rounding (~0.5 at 100) the tolerance would catch. A
    private generator: the probe must not move the run's CUDA random stream (exact resume)."""
    if not _OUT_DTYPE_ADDMM:
        g = torch.Generator("cuda").manual_seed(0)
        a = torch.randn(32, 64, device="cuda", generator=g).T.bfloat16()
        b = torch.randn(32, 48, device="cuda", generator=g).bfloat16()
        acc = 100 * torch.randn(64, 48, device="cuda", generator=g)
        want = acc + a.float() @ b.float()
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            ok = torch.allclose(acc, want, rtol=1e-5, atol=1e-3)
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _OUT_DTYPE_ADDMM.append(ok)
    return _OUT_DTYPE_ADDMM[0]


def _entropy(support: torch.Tensor, lse: torch.Tensor, masked: bool, rows: int = 256) -> torch.Tensor:
    """H = lse - sum_v p_v * logit_v per row of the support, for logging only. `rows` rows at a time, so the
    `[rows, V]` probabilities are the only temporary whatever the chunk size (the chunk's logits are large)."""
    out = torch.empty_like(lse)
    for i in range(0, support.shape[0], rows):
        sup, z = support[i:i + rows], lse[i:i + rows]
        p = (sup - z[:, None]).exp_()
        finite = sup.nan_to_num(neginf=0.0) if masked else sup  # -inf outside a kept set: p = 0 there
        out[i:i + rows] = z - torch.bmm(p[:, None, :], finite[:, :, None]).view(-1)  # no [n, V] product
    return out


def _exp_sums(logits: torch.Tensor, temperature: float):
    """(x, m, e, total) of `[n, V]` logits (any float dtype, -inf outside a kept set): x the upcast logits /
    temperature, m each row's max (0 for an empty row), e = exp(x - m), total its row sums."""
    x = _upcast(logits) / temperature  # no branch on the value: a float compiles as an input, not a constant
    m = x.amax(-1)
    m = torch.where(m == float("-inf"), 0.0, m)
    e = torch.exp(x - m[:, None])  # 0 outside a kept set
    return x, m, e, e.sum(-1)


def _lse(m: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return torch.where(total > 0, m + torch.log(total), 0.0)  # 0 for an empty row, as the eager head


def _row_lse(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each row's log-normaliser `[n]` (0 for an empty row, as the eager head), in two reads of the row when
    compiled (its max, then the exp sum; nothing `[n, V]` stored)."""
    _, m, _, total = _exp_sums(logits, temperature)
    return _lse(m, total)


def _row_lse_entropy(logits: torch.Tensor, temperature: float):
    """(log-normaliser, entropy) `[n]`: `_row_lse` and lse - sum_v p_v * logit_v from the same pass (an empty
    row: 0 and 0, as the eager head)."""
    x, m, e, total = _exp_sums(logits, temperature)
    lse = _lse(m, total)
    mean = torch.where(e > 0, e * x, 0.0).sum(-1) / total  # no 0 * -inf term outside a kept set
    return lse, torch.where(total > 0, lse - mean, 0.0)


def _logit_grad(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, temperature: float):
    """d(sum_i g_i * logp_i)/d logits `[n, V]`, written over `logits` (its dtype): g * (onehot(token) - p) /
    temperature, p = softmax over the row (0 outside a kept set). Written to be compiled into one elementwise
    pass that reads and writes each element once."""
    x = _upcast(logits) / temperature
    p = torch.exp(x - lse[:, None])
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == ids
    return logits.copy_((onehot.to(x.dtype) - p) * (g / temperature)[:, None])  # in place: no second [n, V]


_COMPILED: dict = {}


def _compiled(fn):
    """`fn` under torch.compile (once per process; dynamic: the last chunk is shorter). A dtype and a one-row
    chunk each compile once more. Past dynamo's recompile limit (8; dynamo warns) a call runs `fn` eagerly: the
    same values, but with ~4 `[n, V]` fp32 temporaries, about twice the eager head's peak."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _fused(compiled: bool, sets) -> bool:
    """Whether a chunk takes the compiled passes: under `compiled`, unless its kept sets are id-encoded."""
    return compiled and (sets is None or sets[0] == "mask")


def _chunk_stats(h, weight, ids, sets, temperature: float, want_stats: bool, compiled: bool):
    """One chunk's (token logit, log-normaliser, in_set or None, entropy or None, unmasked log-normaliser or
    None) `[n]`. Compiled (and no id-encoded sets): `_row_lse(_entropy)` on the matmul's output; else eager on fp32
    logits, which hold ~3 `[n, V]` fp32 temporaries at their peak."""
    if _fused(compiled, sets):
        logits = h @ weight.T  # the head's dtype, as HF's; upcast in the compiled passes
        tok = _upcast(logits.gather(-1, ids).squeeze(-1)) / temperature
        full = _compiled(_row_lse)(logits, temperature) if want_stats and sets is not None else None
        in_set = _kept_support(logits, ids, sets)[2] if sets is not None else None
        if want_stats:
            lse, ent = _compiled(_row_lse_entropy)(logits, temperature)
        else:
            lse, ent = _compiled(_row_lse)(logits, temperature), None
        return tok, lse, in_set, ent, full
    logits = _chunk_logits(h, weight, temperature)  # [n, V]
    tok = logits.gather(-1, ids).squeeze(-1)
    full = torch.logsumexp(logits, -1) if want_stats and sets is not None else None
    support, in_set = logits, None
    if sets is not None:
        support, _, in_set = _kept_support(logits, ids, sets)  # [n, K] or [n, V]
    lse = torch.logsumexp(support, -1)
    lse = lse.masked_fill(lse == float("-inf"), 0.0)  # an empty kept set: no NaN, out = -inf below
    ent = _entropy(support, lse, sets is not None) if want_stats else None
    return tok, lse, in_set, ent, full


def _chunk_logit_grad(h, weight, ids, sets, lse, g, temperature: float, compiled: bool):
    """One chunk's gradient of sum_i g_i * logp_i with respect to its logits `[n, V]`, in `h`'s dtype
    (compiled: `_logit_grad` on the matmul's output; else built in place in the fp32 logits buffer)."""
    if _fused(compiled, sets):
        logits = h @ weight.T
        if sets is not None:
            g = g.masked_fill(~_kept_support(logits, ids, sets)[2], 0.0)  # a token outside its set: no gradient
        return _compiled(_logit_grad)(logits, ids, lse, g, temperature)
    logits = _chunk_logits(h, weight, temperature)
    lse = lse[:, None]
    k = None
    if sets is not None:
        support, k, in_set = _kept_support(logits, ids, sets)
        g = g.masked_fill(~in_set, 0.0)
    if k is None:  # p over the whole row (0 outside a bitmap's set), in the logits buffer
        grad_logits = logits.sub_(lse).exp_()
    else:  # p over the kept ids only, scattered into the zeroed logits buffer
        grad_logits = logits.zero_().scatter_add_(-1, k.clamp(min=0), (support - lse).exp_())
    # d logp_tok / d logits = onehot(tok) - p ; then the 1/temperature of the logits.
    grad_logits.mul_(-g[:, None]).scatter_add_(-1, ids, g[:, None])
    if temperature != 1.0:
        grad_logits.div_(temperature)
    return grad_logits.to(h.dtype)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Forward keeps only `[N]` log-probs and the `[N]` log-normalisers; backward recomputes the logits of
    one chunk at a time (and its kept sets) and turns them into the chunk's gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, kept, chunk_size, temperature, want_stats, compiled):
        n = token_ids.numel()
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out = hidden.new_empty(n, dtype=dtype)
        lse_all = hidden.new_empty(n, dtype=dtype)
        ent = hidden.new_zeros(n if want_stats else 0, dtype=dtype)
        mass = hidden.new_ones(n if want_stats and kept is not None else 0, dtype=dtype)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            sets = kept.chunk(s, e, hidden.device) if kept is not None else None
            tok, lse, in_set, chunk_ent, full = _chunk_stats(hidden[s:e], weight, token_ids[s:e, None], sets,
                                                             temperature, want_stats, compiled)
            lse_all[s:e] = lse
            out[s:e] = tok - lse
            if in_set is not None:  # a token outside its kept set could not have been sampled
                out[s:e].masked_fill_(~in_set, float("-inf"))
            if want_stats:
                ent[s:e] = chunk_ent
                if full is not None:  # the policy's own mass on the kept set, before renormalising
                    mass[s:e] = (lse - full).exp()
        ctx.save_for_backward(hidden, weight, token_ids, lse_all)
        ctx.kept, ctx.chunk_size, ctx.temperature, ctx.compiled = kept, chunk_size, temperature, compiled
        ctx.mark_non_differentiable(ent, mass)
        return out, ent, mass

    @staticmethod
    def backward(ctx, grad_out, _grad_ent, _grad_mass):
        hidden, weight, token_ids, lse_all = ctx.saved_tensors
        kept, chunk_size, temperature = ctx.kept, ctx.chunk_size, ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if need_w else None
        n = token_ids.numel()
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e]
            sets = kept.chunk(s, e, hidden.device) if kept is not None else None
            # Fresh [n] vectors, not views: compiled, views' storage offsets become guards (a recompile whenever
            # two offsets stop being equal).
            grad_logits = _chunk_logit_grad(h, weight, token_ids[s:e, None].clone(), sets, lse_all[s:e].clone(),
                                            grad_out[s:e].to(lse_all.dtype, copy=True), temperature, ctx.compiled)
            if need_h:
                grad_h[s:e] = grad_logits @ weight
            if need_w:
                _accumulate(grad_w, grad_logits.T, h)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,  # [B, L, H] (or [N, H]) final hidden states, after the final norm
    lm_head_weight: torch.Tensor,  # [V, H]
    token_ids: torch.Tensor,  # [B, L] (or [N]) the tokens whose log-prob is wanted (already shifted)
    chunk_size: int = 1024,
    *,
    kept_ids=None,  # optional rl.batch.KeptBatch (anything with its `chunk(s, e, device)`) over the B*L positions
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_stats: bool = False,
    compiled: bool = False,
):
    """log softmax(hidden @ W^T / temperature)[token] per position, chunked over positions.

    Equals the unchunked computation (up to float summation order); gradients flow to `hidden` and
    `lm_head_weight`. With `kept_ids` the softmax is over the kept set only (see module docstring).
    Returns `[B, L]` log-probs (fp32, or fp64 for fp64 inputs), and the per-position entropy (no gradient) if
    `return_entropy`; `return_stats` returns `(logp, entropy, kept_mass)` where kept_mass `[B, L]` is the
    policy's unrenormalised probability of each kept set (1 without kept sets). `compiled`: the chunks'
    softmax passes under torch.compile (module docstring).
    """
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be >= 1, got {chunk_size}")
    shape = token_ids.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = token_ids.reshape(-1).long()
    if h.shape[0] != ids.numel():
        raise ValueError(f"token_logprobs: hidden has {h.shape[0]} positions but token_ids has {ids.numel()}")
    want = return_entropy or return_stats
    logp, ent, mass = _ChunkedTokenLogprobs.apply(h, lm_head_weight, ids, kept_ids, chunk_size, float(temperature), want,
                                                 bool(compiled))
    if return_stats:
        mass = mass.reshape(shape) if mass.numel() else torch.ones_like(logp).reshape(shape)
        return logp.reshape(shape), ent.reshape(shape), mass
    return (logp.reshape(shape), ent.reshape(shape)) if return_entropy else logp.reshape(shape)
