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
    import vllm.v1.sample.ops.topk_topp_sampler as tts

    runner = worker.model_runner
    if not (hasattr(runner, "_sample") and hasattr(runner, "discard_request_mask")):
        raise RuntimeError(f"sampling-mask capture needs vLLM's V1 GPU model runner, got {type(runner).__name__}")
    fwd = runner.sampler.topk_topp_sampler.forward
    if getattr(fwd, "__func__", None) is not tts.TopKTopPSampler.forward_native:
        raise RuntimeError("sampling-mask capture needs the native top-k/top-p sampler (VLLM_USE_FLASHINFER_SAMPLER=0)")
    if getattr(runner, "_kept_state", None) is not None:
        return "already installed"
    state = {"batch": None, "steps": []}
    runner._kept_state = state
    apply_orig, sample_orig = tts.apply_top_k_top_p, runner._sample

    def apply_top_k_top_p(logits, k, p):
        out = apply_orig(logits, k, p)  # the Triton path may return a new tensor: read the result
        if state["batch"] is not None:
            state["batch"]["kept"] = out.isfinite()
        return out

    def _sample(logits, spec_decode_metadata):
        if spec_decode_metadata is not None:
            raise RuntimeError("sampling-mask capture does not support speculative decoding")
        ib = runner.input_batch
        n = ib.num_reqs
        batch = {"kept": None}
        state["batch"] = batch
        try:
            out = sample_orig(logits, spec_decode_metadata)
        finally:
            state["batch"] = None
        state["steps"].append(record_step(batch["kept"], out.sampled_token_ids[:n, 0], list(ib.req_ids[:n]),
                                          ~runner.discard_request_mask.np[:n], ib.temperature_cpu[:n] < 1e-5,
                                          logits.shape[-1]))
        return out

    tts.apply_top_k_top_p = apply_top_k_top_p
    runner._sample = _sample
    return "installed"


def pack_bits(mask):
    """`[B, V]` bool -> `[B, ceil(V/8)]` uint8, little bit order (numpy's packbits(bitorder='little'))."""
    import torch

    B, V = mask.shape
    W = (V + 7) // 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, W * 8 - V))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (m.view(B, W, 8) * weights).sum(-1, dtype=torch.uint8)


def record_step(kept, sampled, req_ids: list, live, greedy, vocab_size: int) -> dict:
    """One sampling step, kept on the device with no host synchronisation (the decode loop keeps its pace):
    the packed kept sets, their sizes, the sampled tokens and whether each was in its set. Greedy rows
    (and an all-greedy batch, which skips top-k/top-p) keep the argmax alone."""
    import torch

    rows = torch.arange(sampled.shape[0], device=sampled.device)
    if kept is None or greedy.any():
        g = torch.as_tensor(greedy, device=sampled.device) if kept is not None else torch.ones_like(rows, dtype=torch.bool)
        kept = torch.zeros(sampled.shape[0], vocab_size, dtype=torch.bool, device=sampled.device) if kept is None else kept.clone()
        kept[g] = False
        kept[rows[g], sampled.long()[g]] = True
    return {"req_ids": req_ids, "live": live.copy(), "bits": pack_bits(kept), "counts": kept.sum(1, dtype=torch.int32),
            "tokens": sampled.to(torch.int32), "ok": kept[rows, sampled.long()], "vocab": vocab_size}


def collect(worker, clear: bool = True) -> dict:
    """The recorded steps since the last collect, per engine request id: `(tokens int32, is_bitmap bool,
    offsets int64, data uint8)` as bytes (cheap to send back through collective_rpc). Rows of at most
    ceil(V/8)/4 ids are stored as ids, larger ones as the bitmap."""
    state = worker.model_runner._kept_state
    steps = state["steps"]
    if clear:
        state["steps"] = []
    return {"vocab": steps[0]["vocab"] if steps else None, "reqs": encode_steps(steps)}


def encode_steps(steps: list[dict]) -> dict:
    import torch

    if not steps:
        return {}
    V = steps[0]["vocab"]
    W = (V + 7) // 8
    bits = torch.cat([s["bits"] for s in steps])  # [N, W] on the device
    counts = torch.cat([s["counts"] for s in steps]).cpu().numpy()
    tokens = torch.cat([s["tokens"] for s in steps]).cpu().numpy()
    ok = torch.cat([s["ok"] for s in steps]).cpu().numpy()
    live = np.concatenate([s["live"] for s in steps])
    owner = [rid for s in steps for rid in s["req_ids"]]
    if not ok[live].all():
        bad = int(np.flatnonzero(live & ~ok)[0])
        raise RuntimeError(f"sampling-mask capture: request {owner[bad]} sampled token {tokens[bad]} outside its kept set")
    small = live & (4 * counts <= W)
    ids = {}  # row -> int32 ids, for the small rows, unpacked on the device a block at a time
    rows_small = np.flatnonzero(small)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    for a in range(0, len(rows_small), 4096):
        block = torch.as_tensor(rows_small[a : a + 4096], device=bits.device)
        dense = ((bits[block][:, :, None] >> shifts) & 1).bool().reshape(len(block), -1)[:, :V]
        r, c = dense.nonzero(as_tuple=True)
        r, c = r.cpu().numpy(), c.to(torch.int32).cpu().numpy()
        for j, row in enumerate(rows_small[a : a + 4096]):
            ids[int(row)] = c[np.searchsorted(r, j) : np.searchsorted(r, j, side="right")]
    bits_host = bits.cpu().numpy()
    per_req: dict[str, list[int]] = {}
    for row in np.flatnonzero(live):
        per_req.setdefault(owner[row], []).append(int(row))
    out = {}
    for rid, rows in per_req.items():
        chunks = [ids[r].view(np.uint8) if r in ids else bits_host[r] for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([c.size for c in chunks])
        out[rid] = (tokens[rows].tobytes(), np.array([r not in ids for r in rows]).tobytes(), offsets.tobytes(),
                    np.concatenate(chunks).tobytes())
    return out


def attach(request_outputs, captured: dict, vocab_size: int) -> dict:
    """`{(request_id, completion index): KeptSets}` for the outputs of one `LLM.generate` call.

    With n > 1 vLLM runs each sample as its own request `"{index}_{parent id}"`. Async scheduling, stop
    strings and aborts may record trailing steps past a completion's last token: they are cut, and each
    kept row is checked against the token it was recorded for."""
    from rollout.sample import KeptSets

    if captured["vocab"] not in (None, vocab_size):
        raise RuntimeError(f"sampling-mask capture: the sampler's vocabulary is {captured['vocab']}, the model's {vocab_size}")
    by_key = {}
    for rid, enc in captured["reqs"].items():
        base = rid.rsplit("-", 1)[0] if rid.count("-") else rid
        index, parent = base.split("_", 1) if "_" in base else (0, base)
        by_key[(parent, int(index))] = enc
    out = {}
    for ro in request_outputs:
        parent = ro.request_id.rsplit("-", 1)[0] if ro.request_id.count("-") else ro.request_id
        for c in ro.outputs:
            enc = by_key.get((parent, c.index)) or by_key.get((ro.request_id, c.index))
            toks = np.asarray(c.token_ids, dtype=np.int32)
            got = None if enc is None else np.frombuffer(enc[0], dtype=np.int32)
            if got is None or len(got) < len(toks) or not np.array_equal(got[: len(toks)], toks):
                raise RuntimeError(f"sampling-mask capture: rows do not match the tokens of {ro.request_id}/{c.index}")
            offsets = np.frombuffer(enc[2], dtype=np.int64)[: len(toks) + 1].copy()
            data = np.frombuffer(enc[3], dtype=np.uint8)[: offsets[-1]].copy()
            bitmap = np.frombuffer(enc[1], dtype=bool)[: len(toks)].copy()
            out[(ro.request_id, c.index)] = KeptSets(vocab_size, offsets, data, bitmap)
    return out
