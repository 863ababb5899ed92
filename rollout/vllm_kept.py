"""Sampling-mask capture for vLLM < 0.28 on GPU: the kept set recorded where vLLM samples.

vLLM 0.28 added `return_sampling_mask` (PR 49577), but only on its V2 model runner, while routed-expert
capture needs the V1 runner; vLLM 0.26 (the version whose torch pin matches our GPU image) has no masks at
all. Asking it for full-vocabulary processed log-probs instead ran at 5.2 tok/s against 2,290 tok/s
without on an H200 at V = 151,936, and returned no -inf at all: neither usable nor trustworthy. So we
record the set where the V1 runner samples:

- `GPUModelRunner._sample` is wrapped to know the batch (request ids, partial-prefill rows to discard,
  greedy rows) and the sampled tokens;
- `topk_topp_sampler.apply_top_k_top_p` (what `TopKTopPSampler.forward_native` calls after temperature,
  min-p and the other processors) is wrapped to keep `isfinite(out)`: exactly the tokens that could be
  sampled. `forward_native` is what runs with `VLLM_USE_FLASHINFER_SAMPLER=0` (set by the engine).
- Each row is stored as int32 ids (small sets) or a little-order bitmap of ceil(V/8) bytes (large sets),
  the same encoding as `rollout.sample.KeptSets`, so nothing is decoded on the way to the learner.

`install` and `collect` run inside vLLM's worker through `LLM.collective_rpc` (this module must be
importable there: it is, from the project root on PYTHONPATH). Not covered: speculative decoding (the
rejection sampler has its own top-k/top-p; refused), the V2 model runner (refused: the engine sets
`VLLM_USE_V2_MODEL_RUNNER=0`), pipeline parallelism. Checked on an H200 with vLLM 0.26 (bench/README.md).
"""
from __future__ import annotations

import numpy as np

ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


def install(worker) -> str:
    """Wrap the V1 runner's sampling of this worker (idempotent)."""
    import torch
    import vllm.v1.sample.ops.topk_topp_sampler as tts

    runner = worker.model_runner
    if not (hasattr(runner, "_sample") and hasattr(runner, "discard_request_mask")):
        raise RuntimeError(f"sampling-mask capture needs vLLM's V1 GPU model runner, got {type(runner).__name__}")
    fwd = runner.sampler.topk_topp_sampler.forward
    if getattr(fwd, "__func__", None) is not tts.TopKTopPSampler.forward_native:
        raise RuntimeError("sampling-mask capture needs the native top-k/top-p sampler (VLLM_USE_FLASHINFER_SAMPLER=0)")
    if getattr(runner, "_kept_state", None) is not None:
        return "already installed"
    state = {"batch": None, "store": {}, "vocab": None}
    runner._kept_state = state
    apply_orig, sample_orig = tts.apply_top_k_top_p, runner._sample

    def apply_top_k_top_p(logits, k, p):
        out = apply_orig(logits, k, p)  # the Triton path may return a new tensor: read the result
        if state["batch"] is not None:
            state["batch"]["kept"] = torch.isfinite(out)
        return out

    def _sample(logits, spec_decode_metadata):
        if spec_decode_metadata is not None:
            raise RuntimeError("sampling-mask capture does not support speculative decoding")
        ib = runner.input_batch
        n = ib.num_reqs
        batch = {"kept": None, "req_ids": list(ib.req_ids[:n]), "discard": runner.discard_request_mask.np[:n].copy(),
                 "greedy": ib.temperature_cpu[:n] < 1e-5}
        state["batch"] = batch
        try:
            out = sample_orig(logits, spec_decode_metadata)
        finally:
            state["batch"] = None
        _record(state, batch, out.sampled_token_ids[:, 0])
        return out

    tts.apply_top_k_top_p = apply_top_k_top_p
    runner._sample = _sample
    return "installed"


def _record(state: dict, batch: dict, sampled) -> None:
    """Append (token, is_bitmap, row bytes) for every live request of one sampling step."""
    import torch

    store, kept = state["store"], batch["kept"]
    tokens = sampled.to("cpu").numpy()
    live = [i for i in range(len(batch["req_ids"])) if not batch["discard"][i]]
    if kept is None:  # an all-greedy batch skips top-k/top-p: the argmax alone could be sampled
        for i in live:
            store.setdefault(batch["req_ids"][i], []).append((int(tokens[i]), False, np.int32(tokens[i]).tobytes()))
        return
    V = state["vocab"] = kept.shape[1]
    dev = kept.device
    width = (V + 7) // 8
    counts = kept.sum(1).cpu().numpy()
    contains = kept[torch.arange(kept.shape[0], device=dev), sampled.long()].cpu().numpy()
    small = [i for i in live if not batch["greedy"][i] and 4 * counts[i] <= width]
    big = [i for i in live if not batch["greedy"][i] and 4 * counts[i] > width]
    rows: dict[int, tuple[bool, bytes]] = {}
    if small:
        cols = kept[torch.as_tensor(small, device=dev)].nonzero()[:, 1].to(torch.int32).cpu().numpy()
        ends = np.cumsum(counts[small])
        for j, i in enumerate(small):
            rows[i] = (False, cols[ends[j] - counts[i] : ends[j]].tobytes())
    if big:
        m = kept[torch.as_tensor(big, device=dev)].to(torch.uint8)
        m = torch.nn.functional.pad(m, (0, width * 8 - V))
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=dev)
        packed = (m.view(len(big), width, 8) * weights).sum(-1, dtype=torch.uint8).cpu().numpy()
        for j, i in enumerate(big):
            rows[i] = (True, packed[j].tobytes())
    for i in live:
        rid = batch["req_ids"][i]
        if batch["greedy"][i]:
            store.setdefault(rid, []).append((int(tokens[i]), False, np.int32(tokens[i]).tobytes()))
            continue
        if not contains[i]:
            raise RuntimeError(f"sampling-mask capture: request {rid} sampled token {tokens[i]} outside its kept set")
        store.setdefault(rid, []).append((int(tokens[i]), *rows[i]))


def collect(worker, clear: bool = True) -> dict:
    """The recorded rows since the last collect, by engine request id (msgpack-friendly)."""
    state = worker.model_runner._kept_state
    out = {"vocab": state["vocab"], "reqs": state["store"]}
    if clear:
        state["store"] = {}
    return out


def attach(request_outputs, captured: dict, vocab_size: int) -> dict:
    """`{(request_id, completion index): KeptSets}` for the outputs of one `LLM.generate` call.

    With n > 1 vLLM runs each sample as its own request `"{index}_{parent id}"`. Async scheduling, stop
    strings and aborts may record trailing steps past a completion's last token: they are cut, and each
    kept row is checked against the token it was recorded for."""
    from rollout.sample import KeptSets

    by_key = {}
    for rid, entries in captured["reqs"].items():
        base = rid.rsplit("-", 1)[0] if rid.count("-") else rid
        if "_" in base:
            index, parent = base.split("_", 1)
            by_key[(parent, int(index))] = entries
        else:
            by_key[(base, 0)] = entries
    out = {}
    for ro in request_outputs:
        parent = ro.request_id.rsplit("-", 1)[0] if ro.request_id.count("-") else ro.request_id
        for c in ro.outputs:
            entries = by_key.get((parent, c.index)) or by_key.get((ro.request_id, c.index))
            toks = list(c.token_ids)
            if entries is None or len(entries) < len(toks) or [e[0] for e in entries[: len(toks)]] != toks:
                raise RuntimeError(f"sampling-mask capture: rows do not match the tokens of {ro.request_id}/{c.index}")
            out[(ro.request_id, c.index)] = KeptSets.from_encoded([(b, raw) for _, b, raw in entries[: len(toks)]], vocab_size)
    return out
