"""Weight-sync time vs the bytes moved divided by measured memcpy bandwidth (the floor for one copy).

The CPU transport: learner weights -> HF safetensors shards in /dev/shm (`export_hf_checkpoint`) -> the
engine loads them (vLLM dense: in-place `reload_weights`; reference engine: `load_state_dict`). Prints each
phase and the ratio (target <= 1.2x). Mode: vLLM in-process, CPU, fp32.

    python bench/weight_sync.py [--sizes tiny,0.5b] [--engines reference,vllm]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from functools import partial

for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
             "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}.items():
    os.environ.setdefault(k, v)

SIZES = {  # Qwen3 dense shapes; "0.5b" is ~0.5e9 parameters
    "tiny": {},
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=64),
}


def memcpy_gbps(nbytes: int = 1 << 30) -> float:
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(3))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,0.5b")
    p.add_argument("--engines", default="reference,vllm")
    a = p.parse_args()
    import torch

    from rollout.engine import EngineConfig, make_engine
    from rollout.reference_engine import load_hf_model
    from rollout.tiny_models import build_tiny_model
    from rollout.weights import export_hf_checkpoint

    bw = memcpy_gbps()
    print(f"memcpy bandwidth: {bw:.2f} GB/s (1 GiB fp32 tensor copy, best of 3)")
    for size in a.sizes.split(","):
        tmp = tempfile.mkdtemp(prefix="bench-sync-")
        src = str(build_tiny_model("dense", os.path.join(tmp, "model"), seed=0, **SIZES[size]))
        model = load_hf_model(src, "float32")
        with torch.no_grad():
            for prm in model.parameters():
                prm.add_(0.01)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        floor = nbytes / (bw * 1e9)
        print(f"\n[{size}] {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {nbytes / 1e6:.1f} MB; "
              f"one memcpy of it = {floor * 1e3:.1f} ms")
        out = "/dev/shm/bench-sync" if os.path.isdir("/dev/shm") else os.path.join(tmp, "sync")
        t_export = _timed(partial(export_hf_checkpoint, model, out, src, bucket_mb=512))
        print(f"  export to {out}: {t_export * 1e3:.0f} ms ({t_export / floor:.1f}x memcpy)")
        for name in a.engines.split(","):
            engine = make_engine(EngineConfig(model=src, engine=name, max_model_len=256))
            engine.update_weights(out, 1)  # warm-up (first load pays imports and page faults)
            t_load = min(_timed(partial(engine.update_weights, out, 1)) for _ in range(2))
            total = t_export + t_load
            print(f"  {name:9s} load: {t_load * 1e3:.0f} ms; export + load = {total * 1e3:.0f} ms "
                  f"= {total / floor:.1f}x memcpy (target <= 1.2x)")
            del engine
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
