"""Weight sync per transport and learner scaling, on 2 GPUs, through the driver's construction path (issue 18).

Every component is built by `rl.components` from a config, as `python -m rl.train` builds it, and the
transport is the one the driver's 'auto' picks from where the actors landed (`components.choose_transport`,
printed); nothing is set by hand. Per model (`--models`) and learner world size (`--worlds`), one Ray session:

- world 1: the learner on half of a GPU, engine `near` on the other half of the same GPU (auto -> CUDA IPC),
  engine `far` on the other GPU (auto -> NCCL);
- world 2: learner ranks on 0.6 of each GPU (FSDP2 over both), engines on the 0.4 left of each: the one on
  rank 0's GPU gets IPC, the other NCCL (rank 0 gathers one tensor at a time and sends).

Sync: `--reps` syncs per engine, the two engines alternating (interleaved), each timed from the driver's call
to every engine's acknowledgement (`WeightSync.sync`, as `time/sync`), plus `--ckpt-reps` syncs through the
checkpoint fallback into `far` (world 1 only). GB/s = the engine-dtype bytes of the learner's weights / time.
Correct: the learner's weights are perturbed, each engine's mismatch KL against the learner is measured
before (control: stale) and after its sync.
Scaling: `far` generates one batch (`--prompts` x n x `--max-tokens`, the config's captures), every sample gets
a +-1 advantage, and `--train-reps` learner steps on that same global batch are timed after one warm-up;
the world-2 / world-1 ratio of medians (sessions run one after the other, so not interleaved). A world not in
`--sync-worlds` starts engine `far` only and times the learner step alone.

    python3 bench/gpu_sync.py [--models moe0.85b,real] [--worlds 1,2] [--reps 5] [--ckpt-reps 1] [--out $OUT]
    python3 bench/gpu_sync.py --models real --worlds 1,2 --sync-worlds 1 --reps 3 --ckpt-reps 0 --train-reps 5
    python bench/gpu_sync.py --cpu    # smoke test here: reference engines, object store, gloo
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from benchstats import spread

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

MODELS = {  # (config name, rl.train overrides); `real`: configs/gpu_real_shape.yaml (Qwen3-30B-A3B's layer shape,
    # 2 layers, vocabulary 151,936); `moe0.85b`: the model of the earlier bench (16 layers, 32 experts, top-4, the
    # tiny tokenizer's 1,030 tokens); `tiny`: the tiny MoE, for --cpu
    "moe0.85b": ("gpu_real_shape", ["+model.tiny_overrides={hidden_size: 1024, num_hidden_layers: 16, num_attention_heads: 16, "
                                    "num_key_value_heads: 4, head_dim: 64, moe_intermediate_size: 512, num_experts: 32, "
                                    "num_experts_per_tok: 4, intermediate_size: 2048, vocab_size: 1030}"]),
    "real": ("gpu_real_shape", []),
    "tiny": ("config", ["model=tiny_moe", "data.eval=null"]),
}
# world size -> (learner GPUs per rank, GPUs per engine `near`, GPUs per engine `far`): see the docstring
SHARES = {1: (0.5, 0.5, 1.0), 2: (0.6, 0.4, 0.4)}


def config(model: str, world: int, engine_gpus: float, learner_gpus: float, run_dir: str, cpu: bool, extra: list[str]):
    from rl.config import load_config

    name, model_over = MODELS[model]
    over = [*model_over, f"trainer.world_size={world}", f"trainer.run_dir={run_dir}", "~rewards.math.language",
            "rollout.gpu_memory_utilization=0.3", "rollout.enforce_eager=true", *extra]
    if cpu:
        over += ["rollout=reference", "rollout.engine_gpus=0", "trainer.learner_gpus=0", "rollout.max_model_len=512",
                 "rollout.max_tokens=64",
                 "cluster.num_cpus=6", "trainer.learner_cpus=1", "rollout.engine_cpus=1"]
    else:
        over += [f"rollout.engine_gpus={engine_gpus}", f"trainer.learner_gpus={learner_gpus}"]
    return load_config(over, name, gpus=0 if cpu else None)


def perturb(learner, seed: int) -> None:
    """Runs on every learner rank (`LearnerGroup.apply`): a small random change to every local weight shard."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed + learner.rank)
    with torch.no_grad():
        for p in learner.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(torch.randn(local.shape, generator=g).to(local) * 0.02 * local.float().std().clamp_min(1e-3).to(local))


def mismatch_kl(learner, mgr, sampling) -> float:
    """Mean k3 KL(engine || learner) over the engine's sampled tokens (the driver's train/mismatch_kl)."""
    import math

    prompts = [[(13 * i + j) % 1000 + 5 for j in range(16 + i % 16)] for i in range(16)]
    samples = [s for g in mgr.generate(prompts, sampling) for s in g]
    mine = learner.logprobs(samples)
    d = [a - b for s, lp in zip(samples, mine) for a, b in zip(lp, s.logprobs)]
    return sum(math.exp(x) - x - 1 for x in d) / len(d)


def weight_bytes(model_dir: str, dtype: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    from rollout.weight_transfer import sync_state

    return sum(t.numel() for t in sync_state(m).values()) * getattr(torch, dtype).itemsize


def session(model: str, world: int, a, run_dir: str) -> dict:
    from rl import components
    from rl.cluster import ray_session

    lg, near_g, far_g = SHARES[world]
    cfgs = {k: config(model, world, g, lg, run_dir, a.cpu, a.overrides) for k, g in (("near", near_g), ("far", far_g))}
    cfg = cfgs["far"]
    s = components.setup(cfg)
    out: dict = {"model": model, "world": world}
    with ray_session(cfg.cluster):
        learner = components.learner(cfg, s.model_path, s.kl_coefs)
        mgrs = {"far": components.engines(cfgs["far"], s.model_path)}  # a whole GPU first, then the half left
        if world in a.sync_worlds:
            mgrs["near"] = components.engines(cfgs["near"], s.model_path)
            measure_sync(learner, mgrs, cfgs, s, world, a, out)
        if a.train_reps:
            measure_train(learner, mgrs["far"], cfg, s, a, out)
        for m in mgrs.values():
            m.shutdown()
        learner.shutdown()
    return out


def measure_sync(learner, mgrs: dict, cfgs: dict, s, world: int, a, out: dict) -> None:
    import dataclasses

    import ray

    from rl import components
    from rollout.weight_transfer import SyncSpec, WeightSync

    cfg, model = cfgs["far"], out["model"]
    syncs = {k: components.weight_sync(cfgs[k], learner, m, s.dir) for k, m in mgrs.items()}
    nbytes = weight_bytes(s.model_path, syncs["far"].spec.dtype)
    out.update(bytes=nbytes, placement={"learner": learner.placement(), **{k: ray.get(m.engines[0].placement.remote())
                                                                              for k, m in mgrs.items()}})
    out["transport"] = {k: w.transport for k, w in syncs.items()}
    print(f"[{model} world {world}] {nbytes / 1e9:.2f} GB per sync ({syncs['far'].spec.dtype}); placement "
          f"{out['placement']}; auto transports {out['transport']}", flush=True)
    sp = dataclasses.replace(components.sampling(cfg.rollout, seed=0, n=1), max_tokens=32)
    version, times = 0, {k: [] for k in syncs}
    for rep in range(a.reps + 1):  # rep 0: the first sync sets up the transport (the NCCL group): not timed
        for k in (("near", "far") if rep % 2 else ("far", "near")):
            version += 1
            t0 = time.perf_counter()
            syncs[k].sync(version)
            if rep:
                times[k].append(time.perf_counter() - t0)
    learner.apply(perturb, 1234)
    out["kl"] = {k: {"stale": mismatch_kl(learner, m, sp)} for k, m in mgrs.items()}
    for k, m in mgrs.items():
        version += 1
        syncs[k].sync(version)
        out["kl"][k]["synced"] = mismatch_kl(learner, m, sp)
    if world == 1 and a.ckpt_reps:
        ckpt = WeightSync(learner, mgrs["far"], SyncSpec("checkpoint", cfg.trainer.sync_bucket_mb, cfg.rollout.dtype),
                          str(s.dir / "weights_sync"))
        times["checkpoint (far)"] = []
        for _ in range(a.ckpt_reps):
            version += 1
            t0 = time.perf_counter()
            ckpt.sync(version)
            times["checkpoint (far)"].append(time.perf_counter() - t0)
    out["sync_s"] = times
    for k, v in times.items():
        label = out["transport"].get(k, "checkpoint")
        print(f"  sync {k:16s} {label:10s} s median {spread(v)}  GB/s {nbytes / statistics.median(v) / 1e9:6.2f}", flush=True)
    for k, v in out["kl"].items():
        print(f"  mismatch KL {k}: stale {v['stale']:.2e} -> after sync {v['synced']:.2e}", flush=True)
    out["loader"] = {k: ray.get(m.engines[0].weight_sync_stats.remote()) for k, m in mgrs.items()}
    print(f"  fused experts copied straight (rollout.weight_transfer.VllmLoader): {out['loader']}", flush=True)

def measure_train(learner, far, cfg, s, a, out: dict) -> None:
    """`--train-reps` learner steps on one global batch generated by `far` (every sample a +-1 advantage)."""
    import dataclasses
    import random

    from rl import components

    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(64)] for _ in range(a.prompts)]
    spt = dataclasses.replace(components.sampling(cfg.rollout, seed=0), max_tokens=a.max_tokens, ignore_eos=True)
    batch = [x for g in far.generate(prompts, spt) for x in g]
    domains = sorted(s.kl_coefs)
    for i, x in enumerate(batch):
        x.advantage = 1.0 if i % 2 else -1.0
        x.reward, x.domain = max(x.advantage, 0.0), domains[i % len(domains)]
    steps = []
    for rep in range(a.train_reps + 1):
        t0 = time.perf_counter()
        learner.train_step(batch)
        if rep:
            steps.append(time.perf_counter() - t0)
    toks = sum(len(x.prompt_ids) + len(x.response_ids) for x in batch)
    out["train_s"], out["train_tokens"] = steps, toks
    print(f"  learner step, {len(batch)} samples, {toks} tokens: s median {spread(steps)}  tok/s "
          f"{toks / statistics.median(steps):,.0f}", flush=True)

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="moe0.85b,real")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ckpt-reps", type=int, default=1)
    p.add_argument("--train-reps", type=int, default=3)
    p.add_argument("--sync-worlds", default=None, help="worlds whose sync is measured (default: all); the others "
                   "start only engine `far` and time the learner step")
    p.add_argument("--train-models", default="real", help="models whose learner step is timed")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--cpu", action="store_true", help="smoke test: reference engines on CPU, tiny model")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("overrides", nargs="*", help="more rl.train overrides")
    a = p.parse_args()
    import torch

    if a.cpu:
        a.models, a.train_models = "tiny", "tiny"
    a.sync_worlds = [int(w) for w in (a.sync_worlds or a.worlds).split(",")]
    where = "CPU" if a.cpu else f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    print(f"{' '.join(sys.argv)}\n{where}, torch {torch.__version__}", flush=True)
    results = []
    for model in a.models.split(","):
        run_dir = tempfile.mkdtemp(prefix=f"bench-sync-{model}-")  # one model_init per model, built once
        for world in map(int, a.worlds.split(",")):
            args = argparse.Namespace(**{**vars(a), "train_reps": a.train_reps if model in a.train_models.split(",") else 0})
            try:
                results.append(session(model, world, args, run_dir))
            except Exception as exc:  # one session's failure must not lose the others' numbers
                import traceback

                traceback.print_exc()
                results.append({"model": model, "world": world, "error": repr(exc)})
            with open(os.path.join(a.out, "gpu_sync.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)
    print("\n| model | world | engine | transport | sync s, median [min, max] | GB/s | mismatch KL stale -> synced |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for k, v in r.get("sync_s", {}).items():  # (sessions whose sync was measured)
            kl = r["kl"].get(k)
            kl = f"{kl['stale']:.2e} -> {kl['synced']:.2e}" if kl else ""
            print(f"| {r['model']} | {r['world']} | {k} | {r['transport'].get(k, 'checkpoint')} | {spread(v)} | "
                  f"{r['bytes'] / statistics.median(v) / 1e9:.2f} | {kl} |")
    steps = {r["world"]: statistics.median(r["train_s"]) for r in results if r.get("train_s")}
    if 1 in steps and 2 in steps:
        print(f"\nlearner step on the same global batch: world 1 {steps[1]:.2f} s, world 2 {steps[2]:.2f} s: "
              f"speed-up {steps[1] / steps[2]:.2f}x (target >= 1.8x)")


if __name__ == "__main__":
    main()
