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
    # Sampling mask: the token ids that top-p/top-k kept at each step, CSR: offsets [L_resp + 1], ids [nnz].
    kept_offsets: np.ndarray | None = None
    kept_ids: np.ndarray | None = None
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
        """Raise if the token-level fields disagree in length (a bug upstream, not a user error)."""
        n = len(self.response_ids)
        for name in ("logprobs", "loss_mask"):
            got = len(getattr(self, name))
            if got != n:
                raise ValueError(f"Sample: {name} has {got} entries for {n} response tokens")
        positions = len(self.prompt_ids) + n - 1
        if self.routed_experts is not None and self.routed_experts.shape[0] != positions:
            raise ValueError(f"Sample: routed_experts has {self.routed_experts.shape[0]} rows for {positions} positions")
        if self.kept_offsets is not None and len(self.kept_offsets) != n + 1:
            raise ValueError(f"Sample: kept_offsets has {len(self.kept_offsets)} entries for {n} tokens (+1)")


def kept_lists_to_csr(kept: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token kept-id lists -> CSR (offsets [n + 1], ids [nnz])."""
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(k) for k in kept])
    ids = np.fromiter((t for k in kept for t in k), dtype=np.int64, count=int(offsets[-1]))
    return offsets, ids
