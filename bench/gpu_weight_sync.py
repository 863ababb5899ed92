"""GPU weight sync: the /dev/shm checkpoint path vs CUDA IPC (colocated) vs NCCL (engine on a second GPU).

The learner process holds a ~0.9B Qwen3-MoE-style model (bf16) on cuda:0; an engine process holds a vLLM
engine (in-process V1 engine) on cuda:0 (colocated) or on cuda:1 (`--nccl`, needs 2 GPUs). Each transport
syncs a freshly perturbed version of the weights; the time is from the learner's first byte to the engine's
acknowledgement. Correctness: after each sync the engine samples from fixed prompts and the learner
recomputes the log-probs of those tokens: the mismatch KL must be at the bf16/routing-noise level, far
below the control (engine still on the previous version).

    python bench/gpu_weight_sync.py [--nccl]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time

SHAPE = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4, intermediate_size=2048)
PROMPTS = [[(13 * i + j) % 1000 + 5 for j in range(16 + i % 16)] for i in range(16)]


def engine_main(model_dir: str, gpu: int, inbox, outbox) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_USE_FLASHINFER_SAMPLER="0")
    from rollout.engine import EngineConfig, SamplingConfig
    from rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(EngineConfig(model=model_dir, dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.4))
    outbox.put("ready")
    while True:
        cmd, *args = inbox.get()
        t0 = time.time()
        if cmd == "stop":
            return
        if cmd == "disk":
            eng.update_weights(*args)
        elif cmd == "ipc":
            eng.update_weights_from_ipc(*args)
        elif cmd == "nccl_init":
            eng.init_weight_group(*args)
        elif cmd == "nccl":
            eng.update_weights_from_nccl(*args)
        elif cmd == "generate":
            out = [g[0] for g in eng.generate(PROMPTS, SamplingConfig(n=1, temperature=1.0, max_tokens=32, seed=1))]
            outbox.put([(s.prompt_ids, s.response_ids, s.logprobs) for s in out])
            continue
        outbox.put(time.time() - t0)


def mismatch_kl(model, samples) -> float:
    """k3 estimate of KL(engine || learner) over the sampled tokens."""
    import torch

    tot, n = 0.0, 0
    with torch.no_grad():
        for prompt, resp, lp_old in samples:
            ids = torch.tensor([prompt + resp], device="cuda")
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
            lp = logp.gather(-1, ids[0, len(prompt):, None])[:, 0].cpu()
            d = lp - torch.tensor(lp_old)
            tot += float((d.exp() - d - 1).sum())
            n += len(resp)
    return tot / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nccl", action="store_true", help="engine on cuda:1, NCCL transport (2 GPUs)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from rl.learner import Learner  # noqa: F401  (same import path as the driver: checks the package imports on GPU)
    from rollout.tiny_models import build_tiny_model
    from rollout.weight_transfer import NcclWeightSender, checkpoint_tensors, ipc_handles
    from rollout.weights import export_hf_checkpoint

    model_dir = str(build_tiny_model("moe", tempfile.mkdtemp(prefix="gpu-moe-"), seed=0, dtype="bfloat16", **SHAPE))
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    eng = ctx.Process(target=engine_main, args=(model_dir, 1 if a.nccl else 0, inbox, outbox))
    eng.start()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    named = list(checkpoint_tensors(model))
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    assert outbox.get(timeout=900) == "ready"
    rows = {"gpu": torch.cuda.get_device_name(0), "params": sum(t.numel() for _, t in named), "bytes": nbytes,
            "tensors": len(named), "mode": "nccl (engine on cuda:1)" if a.nccl else "colocated (both on cuda:0)"}

    def perturb(seed: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for p_ in model.parameters():
                p_.add_(torch.randn(p_.shape, generator=g, device="cuda", dtype=p_.dtype) * 0.01)

    def check(name: str) -> None:
        inbox.put(("generate",))
        rows[f"{name}/mismatch_kl"] = mismatch_kl(model, outbox.get())

    check("initial")
    perturb(1)
    check("control_stale")  # the engine has not been synced: this is what a broken sync looks like
    sender = None
    if a.nccl:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        inbox.put(("nccl_init", "127.0.0.1", port))
        sender = NcclWeightSender("127.0.0.1", port, device=0)
        outbox.get()
    transports = ["disk", "nccl" if a.nccl else "ipc"]
    for rep in range(3):
        for i, tr in enumerate(transports):
            perturb(10 + 2 * rep + i)
            torch.cuda.synchronize()
            t0 = time.time()
            if tr == "disk":
                path = export_hf_checkpoint(model, "/dev/shm/bench-sync", model_dir)
                t_export = time.time() - t0
                inbox.put(("disk", str(path), 1))
            elif tr == "ipc":
                inbox.put(("ipc", ipc_handles(named), 1))
            else:
                inbox.put(("nccl", NcclWeightSender.metas(named), 1))
                sender.send(named)
            outbox.get()  # the engine's load finished
            total = time.time() - t0
            rows.setdefault(f"{tr}/seconds", []).append(round(total, 4))
            if tr == "disk":
                rows.setdefault("disk/export_seconds", []).append(round(t_export, 4))
            if rep == 2:
                check(tr)
    for tr in transports:
        best = min(rows[f"{tr}/seconds"])
        rows[f"{tr}/GB_per_s"] = round(nbytes / best / 1e9, 2)
    rows[f"speedup_{transports[1]}_vs_disk"] = round(min(rows["disk/seconds"]) / min(rows[f"{transports[1]}/seconds"]), 2)
    inbox.put(("stop",))
    eng.join(timeout=120)
    print(json.dumps(rows, indent=1))
    with open(os.path.join(a.out, f"gpu_weight_sync{'_nccl' if a.nccl else ''}.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
