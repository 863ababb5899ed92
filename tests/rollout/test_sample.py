"""KeptSets (compact exact kept sets) and their learner-side expansion (rl.batch.KeptBatch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl.batch import collate, split
from rollout.sample import KeptSets, Sample, Status

V = 1000  # bitmap rows cost ceil(V/8) = 125 bytes: rows with more than 31 ids become bitmaps


def _rows(rng, sizes):
    return [rng.choice(V, size=k, replace=False) for k in sizes]


def test_round_trip_and_encoding_choice():
    rng = np.random.default_rng(0)
    rows = _rows(rng, [1, 31, 32, 500, 999, 1000])
    k = KeptSets.from_lists(rows, V)
    assert [sorted(r.tolist()) for r in rows] == [r.tolist() for r in k.rows()]
    assert k.bitmap.tolist() == [False, False, True, True, True, True]  # 4 * 31 = 124 <= 125 bytes
    assert k.sizes().tolist() == [1, 31, 32, 500, 999, 1000]
    assert k.nbytes < 6 * 125 + 4 * 32 + 64  # never more than V/8 bytes a row (plus offsets and flags)
    mask = np.zeros((len(rows), V), dtype=bool)
    for j, r in enumerate(rows):
        mask[j, r] = True
    assert all(np.array_equal(a, b) for a, b in zip(KeptSets.from_mask(mask).rows(), k.rows()))


def test_worst_case_bytes_at_a_real_vocabulary():
    """Near-uniform top-p 0.95 at V = 151,936 keeps ~144k ids: 18,992 bytes a token, not 1.2 MB."""
    big = 151_936
    k = KeptSets.from_lists([np.arange(int(0.95 * big))], big)
    assert k.data.nbytes == (big + 7) // 8
    assert k.row(0).tolist() == list(range(int(0.95 * big)))


def test_from_encoded_equals_from_lists():
    """Rows recorded on the GPU (rollout.vllm_kept) arrive encoded; they decode to the same sets."""
    rng = np.random.default_rng(3)
    rows = _rows(rng, [2, 600, 9])
    enc = [(False, np.sort(rows[0]).astype("<i4").tobytes()),
           (True, np.packbits(np.isin(np.arange(1000), rows[1]), bitorder="little").tobytes()),
           (False, rows[2].astype("<i4").tobytes())]
    got = KeptSets.from_encoded(enc, V)
    assert [sorted(r.tolist()) for r in got.rows()] == [sorted(r.tolist()) for r in rows]
    with pytest.raises(ValueError, match="row 0 has 3 bytes"):
        KeptSets.from_encoded([(False, b"abc")], V)


def test_take_and_concat():
    rng = np.random.default_rng(1)
    a = KeptSets.from_lists(_rows(rng, [3, 200]), V)
    b = KeptSets.from_lists(_rows(rng, [40, 2, 7]), V)
    both = KeptSets.concat([a, b])
    assert [r.tolist() for r in both.rows()] == [r.tolist() for r in a.rows() + b.rows()]
    assert [r.tolist() for r in both.take(3).rows()] == [r.tolist() for r in both.rows()[:3]]


def test_validate_rejects_a_token_outside_its_set_and_an_empty_set():
    s = Sample(prompt_ids=[1, 2], response_ids=[5, 6], logprobs=[-0.1, -0.2], loss_mask=[1, 1], status=Status.COMPLETED)
    s.kept = KeptSets.from_lists([[5, 9], [7]], V)
    with pytest.raises(ValueError, match=r"response token 1 \(6\) is not in its kept set"):
        s.validate()
    s.kept = KeptSets.from_lists([[5], []], V)
    with pytest.raises(ValueError, match="response token 1"):
        s.validate()
    s.kept = KeptSets.from_lists([[5], list(range(0, 500))], V)  # a bitmap row holding 6
    s.validate()
    with pytest.raises(ValueError, match="ids outside"):
        KeptSets.from_lists([[V]], V)


def test_kept_batch_dense_matches_a_loop_and_micro_batches():
    rng = np.random.default_rng(2)
    samples = []
    for P, R in ((3, 4), (5, 2), (2, 6)):
        resp = rng.integers(0, V, R).tolist()
        rows = [np.union1d(r, [t]) for r, t in zip(_rows(rng, rng.integers(1, 300, R)), resp)]
        s = Sample(prompt_ids=list(range(P)), response_ids=resp, logprobs=[0.0] * R, loss_mask=[1] * R,
                   status=Status.COMPLETED, kept=KeptSets.from_lists(rows, V))
        s.validate()
        samples.append(s)
    batch = collate(samples)
    T = batch.input_ids.shape[1]
    want = torch.ones(3 * T, V, dtype=torch.bool)  # positions without a set are unrestricted
    for b, s in enumerate(samples):
        for j, r in enumerate(s.kept.rows()):
            want[b * T + len(s.prompt_ids) - 1 + j] = False
            want[b * T + len(s.prompt_ids) - 1 + j, r] = True
    for lo, hi in ((0, 3 * T), (0, 5), (5, 3 * T - 1)):
        assert torch.equal(batch.kept.dense(lo, hi, "cpu"), want[lo:hi])
    for b, mb in enumerate(split(batch, 1)):
        assert torch.equal(mb.kept.dense(0, T, "cpu"), want[b * T : (b + 1) * T])


def _collate_loop(samples, pad_id):
    """The alignment of rl.batch's module docstring, one row at a time: the reference for the vectorised collate."""
    B, T = len(samples), max(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    ids, tg, attn = (torch.full((B, T), pad_id), torch.full((B, T), pad_id), torch.zeros(B, T, dtype=torch.long))
    lm, lp = torch.zeros(B, T), torch.zeros(B, T)
    layers, k = samples[0].routed_experts.shape[1:]
    routed = torch.arange(k).expand(B, T, layers, k).clone()
    for b, s in enumerate(samples):
        seq, P, R = list(s.prompt_ids) + list(s.response_ids), len(s.prompt_ids), len(s.response_ids)
        for t in range(P + R - 1):
            ids[b, t], tg[b, t], attn[b, t] = seq[t], seq[t + 1], 1
            routed[b, t] = torch.as_tensor(s.routed_experts[t], dtype=torch.long)
        for j in range(R):
            lm[b, P - 1 + j], lp[b, P - 1 + j] = float(s.loss_mask[j]), s.logprobs[j]
    return ids, attn, tg, lm, lp, routed


@pytest.mark.parametrize("seed", range(4))
def test_collate_equals_the_row_by_row_alignment(seed):
    """The vectorised collate (one tensor per field for the batch) against a per-position loop: ragged prompts and
    responses (a one-token prompt, an empty response, a tool-result hole in the loss mask), uint8 routed experts as
    vLLM gives them, a pad id that is also a real token."""
    rng = np.random.default_rng(seed)
    samples = []
    for b in range(int(rng.integers(1, 7))):
        P, R = int(rng.integers(1, 9)), int(rng.integers(0, 12)) if b else 0
        mask = (rng.random(R) < 0.8).astype(int).tolist()
        samples.append(Sample(prompt_ids=rng.integers(0, V, P).tolist(), response_ids=rng.integers(0, V, R).tolist(),
                              logprobs=(-rng.random(R)).tolist(), loss_mask=mask, status=Status.COMPLETED,
                              routed_experts=rng.integers(0, 8, (P + R - 1, 3, 2), dtype=np.uint8), advantage=0.5))
        samples[-1].validate()
    if max(len(s.prompt_ids) + len(s.response_ids) for s in samples) < 2:
        samples[0].response_ids, samples[0].logprobs, samples[0].loss_mask = [5], [-0.5], [1]
        samples[0].routed_experts = np.zeros((len(samples[0].prompt_ids), 3, 2), dtype=np.uint8)
    got = collate(samples, pad_id=7)
    want = _collate_loop(samples, pad_id=7)
    for name, w in zip(("input_ids", "attention_mask", "targets", "loss_mask", "logp_old"), want):
        g = getattr(got, name)
        assert g.dtype == w.dtype and torch.equal(g, w), name
    assert got.routed_experts.dtype == torch.uint8 and torch.equal(got.routed_experts.long(), want[-1])  # vLLM's dtype kept


def test_collate_refuses_lengths_that_would_shift_into_the_next_row():
    """The flat scatter only needs the totals to match: one sample a token short and its neighbour a token long
    would slide values across rows. collate checks each sample's lengths first."""
    a = Sample(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2], loss_mask=[1], status=Status.COMPLETED)
    b = Sample(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-0.1, -0.2], loss_mask=[1, 1, 1], status=Status.COMPLETED)
    with pytest.raises(ValueError, match="loss_mask has 1 entries for 2 response tokens"):
        collate([a, b])
