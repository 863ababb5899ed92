"""The one record that travels from the rollout engine through scoring to the loss (slime's `Sample`).

Everything about one completion lives here; nothing is parallel-indexed by hand. Token-level fields are
aligned with `response_ids` (one entry per generated token).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Status(enum.Enum):
    PENDING = "pending"  # not generated yet
    COMPLETED = "completed"  # the model stopped (EOS / stop token)
    TRUNCATED = "truncated"  # hit max_tokens or the context limit
    ABORTED = "aborted"  # the engine failed or was killed; counted, never silently dropped
    FAILED = "failed"  # a non-engine failure (bad prompt, tool crash...); `error` says why


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    # log pi_old(o_t): the engine's probability of each sampled token under the distribution it actually
    # sampled from (after temperature / top-p / top-k). [L_resp]
    logprobs: list[float] = field(default_factory=list)
    # 1 for tokens the policy generated (trained), 0 for tokens appended from outside (tool results). [L_resp]
    loss_mask: list[int] = field(default_factory=list)
    # MoE only: expert ids the engine used at every position it ran, per MoE layer:
    # [len(prompt_ids) + len(response_ids) - 1, layers, top_k] (vLLM's layout). Prompt positions are
    # included because replaying only the response's routing would leave the prompt's KV computed with
    # other experts, and the response's log-probs would still differ from the engine's.
    routed_experts: np.ndarray | None = None
    # Sampling mask: the token ids that top-p/top-k kept at each generated token (exact, compact). [L_resp rows]
    kept: "KeptSets | None" = None
    finish_reason: str | None = None
    status: Status = Status.PENDING
    error: str | None = None
    policy_version: int = 0  # version of the weights that generated this sample
    prompt_index: int = -1  # which prompt of the batch (group id); samples of one group share it
    domain: str = "default"
    metadata: dict[str, Any] = field(default_factory=dict)  # the data row's fields (answer, tests, language...)
    rewards: dict[str, float | None] = field(default_factory=dict)  # filled by the scorers, per dimension
    reward: float | None = None  # the weighted scalar used for the advantage; None = abstained
    advantage: float = 0.0
    text: str | None = None  # decoded response, filled for scoring
    # Tool-use episodes (rollout.agent): earlier training segments of the same episode (closed by context
    # management; they share this sample's reward and advantage) and the episode's counters.
    segments: list["Sample"] = field(default_factory=list)
    tool_stats: dict[str, int] = field(default_factory=dict)

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def validate(self) -> None:
        """Raise if the token-level fields disagree in length, or a sampled token is outside its kept set (a bug
        upstream, not a user error)."""
        self.validate_lengths()
        if self.kept is not None:
            # A sampled token outside its kept set (or an empty set) has no probability under pi_old: the
            # engine's capture is broken, and the ratio would be 0/0 or x/0.
            bad = self.kept.first_missing(self.response_ids)
            if bad is not None:
                raise ValueError(f"Sample: response token {bad} ({self.response_ids[bad]}) is not in its kept set")

    def validate_lengths(self) -> None:
        """Raise if the token-level fields disagree in length (cheap: no look inside the kept sets)."""
        n = len(self.response_ids)
        for name in ("logprobs", "loss_mask"):
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(f"Sample: {name} has {got} entries for {n} response tokens")
        positions = len(self.prompt_ids) + n - 1
        if self.routed_experts is not None and self.routed_experts.shape[0] != positions:
            raise ValueError(f"Sample: routed_experts has {self.routed_experts.shape[0]} rows for {positions} positions")
        if self.kept is not None and len(self.kept) != n:
            raise ValueError(f"Sample: kept has {len(self.kept)} rows for {n} response tokens")


@dataclass(frozen=True)
class KeptSets:
    """The kept sets of a sequence's generated tokens, exact and compact.

    Row j is either its token ids (int32) or, when that would be larger, a bitmap over the vocabulary
    (ceil(V/8) bytes, little bit order); a row never costs more than V/8 bytes. At V = 151,936: a peaked
    distribution keeping 20 tokens costs 80 B a token; top-p 0.95 over a near-uniform one costs 18,992 B
    (a padded int64 row would cost 1.2 MB). The learner expands one chunk of rows at a time into a boolean
    `[chunk, V]` mask (`rl.batch.KeptBatch`), never more than the chunked head's own logits.
    """

    vocab_size: int
    offsets: np.ndarray  # int64 [R + 1] byte offsets of each row in `data`
    data: np.ndarray  # uint8 [nbytes]
    bitmap: np.ndarray  # bool [R]: row is a bitmap (else int32 ids)

    def __len__(self) -> int:
        return len(self.bitmap)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes + self.bitmap.nbytes)

    @classmethod
    def from_lists(cls, rows, vocab_size: int) -> "KeptSets":
        """From per-token id collections (lists or arrays)."""
        return cls._pack([np.asarray(r, dtype=np.int64) for r in rows], vocab_size)

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "KeptSets":
        """From a boolean `[R, V]` mask (True = kept)."""
        return cls._pack([np.flatnonzero(m) for m in mask], mask.shape[1])

    @classmethod
    def from_encoded(cls, rows: list[tuple[bool, bytes]], vocab_size: int) -> "KeptSets":
        """From rows already encoded as (is_bitmap, bytes): int32 ids or a ceil(V/8)-byte little-order bitmap
        (what `rollout.vllm_kept` records on the GPU); nothing is decoded."""
        width = (vocab_size + 7) // 8
        bad = [j for j, (b, raw) in enumerate(rows) if ((len(raw) != width) if b else (len(raw) % 4 != 0))]
        if bad:
            raise ValueError(f"KeptSets: row {bad[0]} has {len(rows[bad[0]][1])} bytes, not a bitmap or int32 ids")
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(raw) for _, raw in rows])
        data = np.frombuffer(b"".join(raw for _, raw in rows), dtype=np.uint8).copy()
        return cls(vocab_size, offsets, data, np.array([b for b, _ in rows], dtype=bool))

    @classmethod
    def _pack(cls, rows: list[np.ndarray], vocab_size: int) -> "KeptSets":
        width = (vocab_size + 7) // 8
        chunks, bitmap = [], np.zeros(len(rows), dtype=bool)
        for j, ids in enumerate(rows):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"KeptSets: row {j} has ids outside [0, {vocab_size})")
            if 4 * ids.size > width:
                bits = np.zeros(width * 8, dtype=bool)
                bits[ids] = True
                chunks.append(np.packbits(bits, bitorder="little"))
                bitmap[j] = True
            else:
                chunks.append(np.unique(ids).astype("<i4").view(np.uint8))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([c.size for c in chunks])
        data = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
        return cls(vocab_size, offsets, data, bitmap)

    def row(self, j: int) -> np.ndarray:
        """Row j's kept ids, sorted (int64)."""
        seg = self.data[self.offsets[j] : self.offsets[j + 1]]
        if self.bitmap[j]:
            return np.flatnonzero(np.unpackbits(seg, bitorder="little")[: self.vocab_size])
        return seg.view("<i4").astype(np.int64)

    def rows(self) -> list[np.ndarray]:
        return [self.row(j) for j in range(len(self))]

    def sizes(self) -> np.ndarray:
        """Kept-set size of every row (int64 [R])."""
        return np.array([len(self.row(j)) if self.bitmap[j] else (self.offsets[j + 1] - self.offsets[j]) // 4
                         for j in range(len(self))], dtype=np.int64)

    def first_missing(self, tokens) -> int | None:
        """The first row whose token is not in its set (None when every token is kept)."""
        for j, t in enumerate(tokens):
            seg = self.data[self.offsets[j] : self.offsets[j + 1]]
            if self.bitmap[j]:
                ok = 0 <= t < self.vocab_size and bool(seg[t >> 3] >> (t & 7) & 1)
            else:
                ok = bool((seg.view("<i4") == t).any())
            if not ok:
                return j
        return None

    def take(self, stop: int) -> "KeptSets":
        """The first `stop` rows."""
        return KeptSets(self.vocab_size, self.offsets[: stop + 1].copy(), self.data[: self.offsets[stop]].copy(),
                        self.bitmap[:stop].copy())

    @staticmethod
    def concat(parts: list["KeptSets"]) -> "KeptSets":
        vocab = {p.vocab_size for p in parts}
        if len(vocab) != 1:
            raise ValueError(f"KeptSets.concat: vocabulary sizes differ: {sorted(vocab)}")
        offsets = [np.zeros(1, dtype=np.int64)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return KeptSets(vocab.pop(), np.concatenate(offsets), np.concatenate([p.data for p in parts]),
                        np.concatenate([p.bitmap for p in parts]))
