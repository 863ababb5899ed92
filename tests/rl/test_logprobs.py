"""Chunked log-probs equal the unchunked computation, values and gradients; sampling-mask renormalisation."""
from __future__ import annotations

import math

import pytest
import torch

from rl.algos import token_logprobs


def _inputs(B=3, L=7, H=16, V=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, V, (B, L), generator=g)
    return hidden, w, ids


def _same_grads(out: torch.Tensor, ref: torch.Tensor, inputs: tuple, tol: float = 1e-9, retain: bool = False) -> None:
    """d out.sum() == d ref.sum() with respect to every input."""
    got = torch.autograd.grad(out.sum(), inputs)
    want = torch.autograd.grad(ref.sum(), inputs, retain_graph=retain)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


class Padded:
    """Kept sets as a padded `[..., K]` id tensor (-1 = padding) behind `rl.batch.KeptBatch`'s `chunk`
    interface (what `token_logprobs` reads): the small hand-made inputs of these tests."""

    def __init__(self, padded: torch.Tensor):
        self.padded = padded.reshape(-1, padded.shape[-1]).long()

    def chunk(self, s: int, e: int, device):
        return "ids", self.padded[s:e].to(device), torch.ones(e - s, dtype=torch.bool, device=device)


def sampling_mask_logprobs(logits, token_ids, kept):
    """The dense oracle: log-probs of `token_ids` under softmax(logits) with every logit outside the
    position's kept set (`[..., K]`, -1 = padding) at -inf."""
    V = logits.shape[-1]
    allowed = torch.zeros(*kept.shape[:-1], V + 1, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(kept < 0, V, kept), True)
    masked = logits.masked_fill(~allowed[..., :V], float("-inf"))
    return torch.log_softmax(masked, -1).gather(-1, token_ids[..., None]).squeeze(-1)


def _full(hidden, w, ids, temperature=1.0):
    logits = (hidden @ w.T) / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("chunk_size,temperature", [(1, 1.0), (4, 1.0), (5, 0.7), (1000, 1.3)])
def test_chunked_equals_full_values_and_gradients(chunk_size, temperature, compiled):
    hidden, w, ids = _inputs()
    up = torch.randn(ids.shape, dtype=torch.float64)
    out = token_logprobs(hidden, w, ids, chunk_size, temperature=temperature, compiled=compiled)
    gh, gw = torch.autograd.grad((out * up).sum(), (hidden, w))
    ref = _full(hidden, w, ids, temperature)
    rh, rw = torch.autograd.grad((ref * up).sum(), (hidden, w))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("compiled", [False, True])
def test_entropy_matches_full(compiled):
    hidden, w, ids = _inputs()
    _, ent = token_logprobs(hidden, w, ids, 4, return_entropy=True, compiled=compiled)
    logq = torch.log_softmax(hidden @ w.T, -1)
    torch.testing.assert_close(ent, -(logq.exp() * logq).sum(-1).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_entropy_row_slices_equal_one_pass(masked):
    """The entropy is computed a few rows at a time (bounded temporaries at any chunk size): every slicing,
    including one that leaves a short last slice, equals -sum p log p over the whole support at once."""
    from rl.logprobs import _entropy

    g = torch.Generator().manual_seed(5)
    support = torch.randn(11, 40, generator=g, dtype=torch.float64) * 3
    if masked:
        support[torch.rand(11, 40, generator=g) < 0.5] = float("-inf")
        support[:, 0] = 1.0  # every row keeps at least one token
    lse = torch.logsumexp(support, -1)
    logp = (support - lse[:, None]).log_softmax(-1)
    want = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
    for rows in (1, 4, 11, 256):
        torch.testing.assert_close(_entropy(support, lse, masked, rows=rows), want, rtol=1e-12, atol=1e-12)


def test_sampling_mask_golden():
    # p proportional to [1, 2, 3, 4]; kept {1, 2} -> p(2) = 3 / (2 + 3), p(1) = 2/5; token 3 outside -> -inf.
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3))
    kept = torch.tensor([[1, 2, -1], [1, 2, -1], [2, 1, -1]])
    out = sampling_mask_logprobs(logits, torch.tensor([2, 1, 3]), kept)
    assert out[0].item() == pytest.approx(math.log(3 / 5)) and out[1].item() == pytest.approx(math.log(2 / 5))
    assert out[2].item() == -math.inf


def _sampling_mask_loop(logits, ids, kept):
    out = []
    for row, t, k in zip(logits, ids, kept):
        ks = [x for x in k.tolist() if x >= 0]
        masked = torch.full_like(row, -math.inf)
        masked[ks] = row[ks]
        out.append(torch.log_softmax(masked, -1)[t])
    return torch.stack(out)


def test_chunked_sampling_mask_equals_full_and_loop():
    B, L, V, K = 2, 5, 30, 6
    hidden, w, _ = _inputs(B, L, 8, V, seed=4)
    g = torch.Generator().manual_seed(5)
    kept = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * L)]).reshape(B, L, K)
    kept[..., -2:] = torch.where(torch.rand(B, L, 2, generator=g) < 0.5, -1, kept[..., -2:])  # ragged sets
    ids = kept[..., 0]  # the sampled token is always in its kept set
    out = token_logprobs(hidden, w, ids, 3, kept_ids=Padded(kept))
    logits = hidden @ w.T
    full = sampling_mask_logprobs(logits, ids, kept)
    loop = _sampling_mask_loop(logits.reshape(-1, V), ids.reshape(-1), kept.reshape(-1, K)).reshape(B, L)
    torch.testing.assert_close(full, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    _same_grads(out, loop, (hidden, w))


def test_full_kept_set_is_the_plain_softmax():
    hidden, w, ids = _inputs(2, 3, 8, 12, seed=6)
    everything = torch.arange(12).expand(2, 3, 12)
    torch.testing.assert_close(token_logprobs(hidden, w, ids, 2, kept_ids=Padded(everything)), _full(hidden, w, ids))


def test_bad_shapes_fail_clearly():
    hidden, w, ids = _inputs()
    with pytest.raises(ValueError, match="hidden has 21 positions but token_ids has 20"):
        token_logprobs(hidden, w, ids.reshape(-1)[:20], 4)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        token_logprobs(hidden, w, ids, 0)


def test_bf16_inputs_give_bf16_grads_close_to_fp32():
    hidden, w, ids = _inputs(2, 8, 32, 64, seed=7, dtype=torch.float32)
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    out = token_logprobs(hb, wb, ids, 5)
    out.sum().backward()
    assert out.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = token_logprobs(hidden, w, ids, 5)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0.1)
    torch.testing.assert_close(wb.grad.float(), w.grad, rtol=0.05, atol=0.05)


def test_empty_kept_row_and_token_outside_its_set_are_finite_in_gradients():
    """An all-padding kept row and a sampled token outside its set (both rejected upstream by
    Sample.validate) give log-prob -inf and a zero, finite gradient, never NaN."""
    hidden, w, ids = _inputs(1, 3, 8, 12, seed=7)
    kept = torch.full((1, 3, 4), -1)
    kept[0, 0, :2] = torch.tensor([ids[0, 0], 3])  # a normal row
    kept[0, 2, :1] = (ids[0, 2] + 1) % 12  # the token is not in its set; row 1 stays all padding
    out, ent, mass = token_logprobs(hidden, w, ids, 2, kept_ids=Padded(kept), return_stats=True)
    assert torch.isfinite(out[0, 0]) and out[0, 1] == float("-inf") and out[0, 2] == float("-inf")
    assert not torch.isnan(ent).any() and not torch.isnan(mass).any()
    loss = torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum()
    gh, gw = torch.autograd.grad(loss, (hidden, w))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert gh[0, 1].abs().sum() == 0 and gh[0, 2].abs().sum() == 0


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_kept_batch_ids_and_bitmap_chunks_equal_the_loop(chunk, compiled):
    """rl.batch.KeptBatch through the chunked head: id-encoded chunks (gathered logits) and chunks with a
    bitmap row (a dense mask) give the loop's renormalised log-probs and gradients at response positions."""
    import numpy as np

    from rl.batch import collate
    from rollout.sample import KeptSets, Sample, Status

    V, H = 1000, 8
    rng = np.random.default_rng(0)
    samples, sets = [], []
    for P, R, big in ((3, 5, (1, 3)), (2, 4, ()), (4, 6, (5,))):
        resp = rng.integers(0, V, R)
        rows = [np.union1d(rng.choice(V, 600 if j in big else 6, replace=False), [t]) for j, t in enumerate(resp)]
        samples.append(Sample(prompt_ids=list(range(1, P + 1)), response_ids=resp.tolist(), logprobs=[0.0] * R,
                              loss_mask=[1] * R, status=Status.COMPLETED, kept=KeptSets.from_lists(rows, V)))
        sets.append(rows)
    batch = collate(samples)
    B, T = batch.targets.shape
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    out = token_logprobs(hidden, w, batch.targets, chunk, kept_ids=batch.kept, compiled=compiled)
    on = batch.loss_mask > 0
    logits = hidden @ w.T
    ref = []
    for b, s in enumerate(samples):
        for j, ks in enumerate(sets[b]):
            t = len(s.prompt_ids) - 1 + j
            masked = torch.full((V,), float("-inf"), dtype=torch.float64)
            masked[torch.as_tensor(ks)] = logits[b, t, torch.as_tensor(ks)]
            ref.append(torch.log_softmax(masked, -1)[s.response_ids[j]])
    ref = torch.stack(ref)
    torch.testing.assert_close(out[on], ref, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()  # prompt and padding positions: {target}, log-prob 0
    _same_grads(out[on], ref, (hidden, w), retain=True)
    # The learner's head runs only at the loss's positions: KeptBatch.select renumbers their sets. One response
    # position is left out too (its set must be dropped, not shifted onto the next position).
    at = on.reshape(-1).nonzero().squeeze(1)
    at = torch.cat([at[:4], at[5:]])
    sel = token_logprobs(hidden.reshape(-1, H)[at], w, batch.targets.reshape(-1)[at], chunk, kept_ids=batch.kept.select(at),
                         compiled=compiled)
    ref_at = torch.cat([ref[:4], ref[5:]])
    torch.testing.assert_close(sel, ref_at, rtol=1e-10, atol=1e-10)
    _same_grads(sel, ref_at, (hidden, w))


class Bitmap:
    """Kept sets as a dense boolean `[N, V]` mask behind KeptBatch's `chunk` (every chunk in "mask" mode)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def chunk(self, s: int, e: int, device):
        return "mask", self.mask[s:e].to(device), torch.ones(e - s, dtype=torch.bool, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_head_equals_eager(dtype):
    """`compiled=True` (trainer.compile) computes each chunk's softmax statistics and logit gradient in compiled
    passes over the matmul's own output: log-probs, entropy, kept mass and gradients equal the eager head's,
    with bitmap kept sets, an empty set, a token outside its set, a temperature and a short last chunk."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache: earlier tests' compilations must not push these calls past the limit
    counters.clear()
    N, H, V = 23, 16, 300
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, V, generator=g) < 0.3
    mask[torch.arange(N), ids] = True
    mask[4] = False  # an empty set
    mask[9, ids[9]] = False  # the token outside its set
    up = torch.randn(N, generator=g, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    got = {}
    for compiled in (False, True):
        for kept in (None, Bitmap(mask)):
            out, ent, mass = token_logprobs(hidden, w, ids, 5, kept_ids=kept, temperature=0.7, return_stats=True,
                                            compiled=compiled)
            loss = torch.where(torch.isfinite(out), out, 0.0) * up
            got[compiled, kept is None] = (out, ent, mass, *torch.autograd.grad(loss.sum(), (hidden, w)))
    exact = dtype == torch.float64
    for plain in (False, True):
        eager, comp = got[False, plain], got[True, plain]
        for a, b, name in zip(eager, comp, ("logp", "entropy", "kept_mass", "grad hidden", "grad weight")):
            tol = 1e-12 if exact else (1e-4 if name in ("logp", "entropy", "kept_mass") else 1e-2)  # fp32 sums
            torch.testing.assert_close(b, a, rtol=tol, atol=tol, equal_nan=False, msg=f"{name} (plain={plain})")
    assert counters["stats"]["unique_graphs"] >= 3  # the passes ran compiled (not eager after a fallback)
    out = got[True, False][0]
    assert out[4] == float("-inf") and out[9] == float("-inf") and torch.isfinite(got[True, False][3]).all()


def test_learner_head_at_loss_positions_equals_every_position():
    """rl.learner.ChunkedLogprobHead computes only the requested positions (the loss's): there its log-probs,
    entropy, kept mass and gradients equal the all-positions computation; elsewhere 0, 0 and 1."""
    from rl.learner import ChunkedLogprobHead

    hidden, w, ids = _inputs(3, 7, 16, 50, seed=3)
    head = ChunkedLogprobHead(torch.nn.Linear(16, 50, bias=False))
    head.weight = torch.nn.Parameter(w.detach().clone())
    on = torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) > 0.4
    at = on.reshape(-1).nonzero().squeeze(1)
    head.request = (ids, None, 4, 0.7, at, False)  # the reference's forward: log-probs only
    no_stats = head(hidden)
    assert head.entropy is None and head.kept_mass is None
    head.request = (ids, None, 4, 0.7, at, True)
    out = head(hidden)
    torch.testing.assert_close(no_stats, out, rtol=0, atol=0)
    full, ent, mass = token_logprobs(hidden, head.weight, ids, 4, temperature=0.7, return_stats=True)
    torch.testing.assert_close(out[on], full[on], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.entropy[on], ent[on], rtol=1e-12, atol=1e-12)
    assert (out[~on] == 0).all() and (head.entropy[~on] == 0).all() and (head.kept_mass == 1).all()
    up = torch.randn(ids.shape, dtype=torch.float64) * on
    _same_grads(out * up, full * up, (hidden, head.weight), tol=1e-10)
