"""Samples -> padded training tensors. A pure function, so the alignment can be tested by hand.

Position t of a row is the model input `(prompt + response)[t]`, predicting `(prompt + response)[t + 1]`;
the row has `P + R - 1` positions, exactly the positions the engine ran (and routed). Response token j is
predicted at position `P - 1 + j`; only those positions carry a loss (times the Sample's own loss_mask,
which is 0 for tool-result tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from rollout.sample import Sample


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`, queued behind the device's work instead of waiting for it. A host-to-GPU copy from
    pageable memory synchronises (torch waits for the stream): mid-step, that leaves the GPU idle while the
    host catches up. A pinned copy with non_blocking does not; torch's pinned-memory cache keeps the buffer
    until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu" or t.numel() == 0:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class TrainBatch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T] the next token at every position
    loss_mask: torch.Tensor  # [B, T] float, 1 on trained response positions
    logp_old: torch.Tensor  # [B, T] engine sampling log-probs (0 off the loss mask)
    advantages: torch.Tensor  # [B]
    kl_coef: torch.Tensor  # [B] beta of each sample's domain
    routed_experts: torch.Tensor | None  # [B, T, layers, k] integer ids in the engine's dtype (vLLM: uint8; reference: int16), or None
    kept: KeptBatch | None  # kept sets (sampling masks) of the response positions, or None


class MissingCapture(ValueError):
    """A sample lacks a capture (routed experts, sampling mask) that the config requires for the loss."""


@dataclass(frozen=True)
class KeptBatch:
    """The kept sets of a `[B, T]` batch, flattened over its `B * T` positions and kept compact (the rows of
    each sample's `rollout.sample.KeptSets`, at that sample's response positions). `dense(s, e)` expands
    positions `[s, e)` into a boolean `[e - s, V]` mask for one chunk of the log-prob head; positions
    without a set (prompt, padding) are unrestricted there (they carry no loss)."""

    vocab_size: int
    width: int  # T: position p is row p // T, column p % T
    pos: torch.Tensor  # long [M] positions that have a set, ascending
    id_pos: torch.Tensor  # long [nnz] position of each stored id, ascending
    ids: torch.Tensor  # int32 [nnz] kept ids of the id-encoded rows
    bit_pos: torch.Tensor  # long [Mb] position of each bitmap row, ascending
    bits: torch.Tensor  # uint8 [Mb, ceil(V / 8)] bitmaps (little bit order)

    @classmethod
    def from_samples(cls, samples: list[Sample], width: int) -> "KeptBatch":
        vocab = {s.kept.vocab_size for s in samples}
        if len(vocab) != 1:
            raise ValueError(f"collate: samples' kept sets have different vocabulary sizes {sorted(vocab)}")
        V = vocab.pop()
        W = (V + 7) // 8
        pos, id_pos, ids, bit_pos, bits = [], [], [], [], []
        for b, s in enumerate(samples):
            k = s.kept
            start = b * width + len(s.prompt_ids) - 1  # response token j is predicted at position P - 1 + j
            rows = np.arange(len(k))
            pos.append(start + rows)
            row_of_byte = np.repeat(rows, np.diff(k.offsets))
            is_bits = k.bitmap[row_of_byte]
            sizes = np.diff(k.offsets) // 4
            id_rows = rows[~k.bitmap]
            ids.append(k.data[~is_bits].view("<i4").astype(np.int64))
            id_pos.append(start + np.repeat(id_rows, sizes[id_rows]))
            bit_pos.append(start + rows[k.bitmap])
            bits.append(k.data[is_bits].reshape(-1, W))
        cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs).astype(dt))  # noqa: E731
        return cls(V, width, cat(pos, np.int64), cat(id_pos, np.int64), cat(ids, np.int32), cat(bit_pos, np.int64),
                   torch.from_numpy(np.concatenate(bits).reshape(-1, W)))

    def rows(self, lo: int, hi: int) -> "KeptBatch":
        """The batch rows `[lo, hi)` (a micro-batch)."""
        a, b = lo * self.width, hi * self.width

        def cut(p: torch.Tensor, *xs: torch.Tensor):
            i, j = torch.searchsorted(p, torch.tensor([a, b])).tolist()
            return (p[i:j] - a, *(x[i:j] for x in xs))

        pos, = cut(self.pos)
        id_pos, ids = cut(self.id_pos, self.ids)
        bit_pos, bits = cut(self.bit_pos, self.bits)
        return KeptBatch(self.vocab_size, self.width, pos, id_pos, ids, bit_pos, bits)

    def select(self, positions: torch.Tensor) -> "KeptBatch":
        """The sets of `positions` (ascending flat positions), renumbered 0..len - 1 in that order as one
        row: what the log-prob head sees when it runs only at those positions. Sets elsewhere are dropped."""
        sel = positions.cpu()

        def keep(p: torch.Tensor, *xs: torch.Tensor):
            if not len(sel):
                return (p[:0], *(x[:0] for x in xs))
            j = torch.searchsorted(sel, p).clamp(max=len(sel) - 1)
            hit = sel[j] == p
            if bool(hit.all()):  # the usual case (sets only where the loss is): no copy of the bitmaps
                return (j, *xs)
            return (j[hit], *(x[hit] for x in xs))

        pos, = keep(self.pos)
        id_pos, ids = keep(self.id_pos, self.ids)
        bit_pos, bits = keep(self.bit_pos, self.bits)
        return KeptBatch(self.vocab_size, max(len(sel), 1), pos, id_pos, ids, bit_pos, bits)

    def chunk(self, s: int, e: int, device):
        """Positions `[s, e)` for the log-prob head: ("ids", padded `[n, K]` ids (-1 = padding), has_set
        `[n]`) when every set there is id-encoded (small: the head gathers K logits a row), else ("mask",
        `dense(s, e)`, all True)."""
        bounds = torch.tensor([s, e])
        i, j = torch.searchsorted(self.bit_pos, bounds).tolist()
        if j > i:
            return "mask", self.dense(s, e, device), torch.ones(e - s, dtype=torch.bool, device=device)
        a, b = torch.searchsorted(self.id_pos, bounds).tolist()
        rows = self.id_pos[a:b] - s
        counts = torch.bincount(rows, minlength=e - s)
        padded = torch.full((e - s, max(int(counts.max()) if b > a else 0, 1)), -1, dtype=torch.long)
        col = torch.arange(b - a) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        padded[rows, col] = self.ids[a:b].long()
        i, j = torch.searchsorted(self.pos, bounds).tolist()
        has = torch.zeros(e - s, dtype=torch.bool)
        has[self.pos[i:j] - s] = True
        return "ids", to_device(padded, device), to_device(has, device)

    def dense(self, s: int, e: int, device) -> torch.Tensor:
        """Boolean `[e - s, V]` mask of positions `[s, e)`: True = kept (or no set recorded)."""
        bounds = torch.tensor([s, e])
        mask = torch.ones(e - s, self.vocab_size, dtype=torch.bool, device=device)
        i, j = torch.searchsorted(self.pos, bounds).tolist()
        mask[to_device(self.pos[i:j] - s, device)] = False
        i, j = torch.searchsorted(self.id_pos, bounds).tolist()
        mask[to_device(self.id_pos[i:j] - s, device), to_device(self.ids[i:j].long(), device)] = True
        i, j = torch.searchsorted(self.bit_pos, bounds).tolist()
        if j > i:
            packed = to_device(self.bits[i:j], device)
            shifts = torch.arange(8, dtype=torch.uint8, device=device)
            unpacked = ((packed[:, :, None] >> shifts) & 1).bool().reshape(j - i, -1)[:, : self.vocab_size]
            mask[to_device(self.bit_pos[i:j] - s, device)] = unpacked
        return mask

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pos, self.id_pos, self.ids, self.bit_pos, self.bits))


def collate(samples: list[Sample], kl_coefs: dict[str, float] | None = None, pad_id: int = 0,
            use_sampling_mask: bool = True, require_routing: bool = False, require_sampling_mask: bool = False) -> TrainBatch:
    """Pad and align `samples` (see module docstring). Routing is included whenever every sample has it
    (the learner decides whether to replay it); sampling masks only with `use_sampling_mask`.
    `require_*`: a sample without that capture raises `MissingCapture` (never a silent fallback)."""
    B = len(samples)
    for name, need, has in (("routed_experts", require_routing, lambda s: s.routed_experts is not None),
                            ("a sampling mask (kept sets)", require_sampling_mask, lambda s: s.kept is not None)):
        missing = [i for i, s in enumerate(samples) if not has(s)] if need else []
        if missing:
            raise MissingCapture(f"{len(missing)} of {B} samples carry no {name} although the config requires it "
                                 f"(first: sample {missing[0]}, domain {samples[missing[0]].domain!r}); the engine "
                                 "did not capture it")
    for s in samples:  # the batch's fields are scattered from flat arrays: one wrong length would shift its neighbours
        s.validate_lengths()  # (the engines checked the kept sets' contents when they built the samples)
    P = torch.tensor([len(s.prompt_ids) for s in samples])
    R = torch.tensor([len(s.response_ids) for s in samples])
    n = P + R - 1  # positions of each row
    T = int(n.max())
    have_routing = all(s.routed_experts is not None for s in samples)
    have_masks = [s.kept is not None for s in samples]
    if use_sampling_mask and any(have_masks) and not all(have_masks):
        raise ValueError("collate: some samples carry sampling masks and some do not; sampling settings must agree")
    have_masks = use_sampling_mask and all(have_masks)
    # One tensor per field for the whole batch, scattered row-major through a [B, T] mask (a tensor per row and
    # field cost ~0.1 ms each: 4 ms of a 100 ms GPU step at B=8, 68 ms at B=256).
    col = torch.arange(T)
    rows = col < n[:, None]  # the row's positions, [B, T]
    answer = (col >= P[:, None] - 1) & (col < (P + R - 1)[:, None])  # positions predicting a response token
    seqs = _flat(chain.from_iterable(chain(s.prompt_ids, s.response_ids) for s in samples), np.int64)
    ends = torch.cumsum(P + R, 0)
    last, first = torch.ones(len(seqs), dtype=torch.bool), torch.ones(len(seqs), dtype=torch.bool)
    last[ends - 1], first[ends - (P + R)] = False, False
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    input_ids[rows], targets[rows] = seqs[last], seqs[first]  # (prompt + response)[:-1] and [1:]
    attn = rows.long()
    loss_mask, logp_old = torch.zeros((B, T)), torch.zeros((B, T))
    loss_mask[answer] = _flat(chain.from_iterable(s.loss_mask for s in samples), np.float32)
    logp_old[answer] = _flat(chain.from_iterable(s.logprobs for s in samples), np.float32)
    routed = kept = None
    if have_routing:
        layers, k = samples[0].routed_experts.shape[1:]
        if any(np.shape(s.routed_experts)[1:] != (layers, k) for s in samples):
            raise ValueError(f"collate: routed_experts of different shapes in one batch (first: [*, {layers}, {k}])")
        ids = np.concatenate([np.asarray(s.routed_experts) for s in samples])
        if ids.dtype not in COMPACT_IDS:
            ids = ids.astype(np.int64)
        # Kept in the engine's dtype (vLLM's uint8): 8x fewer bytes to build and to copy to the GPU than int64;
        # the replay and the agreement widen them there.
        routed = torch.arange(k, dtype=torch.from_numpy(ids[:0]).dtype).expand(B, T, layers, k).clone()  # padding: any valid ids
        routed[rows] = torch.from_numpy(ids)
    if have_masks:
        kept = KeptBatch.from_samples(samples, T)
    betas = torch.tensor([float((kl_coefs or {}).get(s.domain, 0.0)) for s in samples])
    adv = torch.tensor([float(s.advantage) for s in samples])
    return TrainBatch(input_ids, attn, targets, loss_mask, logp_old, adv, betas, routed, kept)


COMPACT_IDS = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64))  # torch has them all


def _flat(values, dtype) -> torch.Tensor:
    """A tensor of an iterable of Python numbers (numpy reads it ~3x faster than torch.tensor reads a list)."""
    return torch.from_numpy(np.fromiter(values, dtype=dtype))


def split(batch: TrainBatch, size: int) -> list[TrainBatch]:
    """Micro-batches of `size` rows (the last may be smaller); padding columns are kept."""
    B = batch.input_ids.shape[0]
    out = []
    for s in range(0, B, size):
        sl = slice(s, s + size)
        out.append(TrainBatch(*(None if v is None else v[sl] for v in (
            batch.input_ids, batch.attention_mask, batch.targets, batch.loss_mask, batch.logp_old,
            batch.advantages, batch.kl_coef, batch.routed_experts)),
            None if batch.kept is None else batch.kept.rows(s, min(s + size, B))))
    return out
