"""End to end against TRL: ours (`python -m rl.train`) vs TRL 1.16's GRPOTrainer, same model, data, reward
spec, group size, lengths, learning rate and steps; trained-sample tokens per second over the steps after
`--warmup` (issue 19 item 5: ours >= 1.5x on 2 GPUs).

- Ours: the quickstart recipe without distillation (`--config-name quickstart distill.enabled=false`), every
  V3.2 correction on as configured there, the engines and the learner placed by the auto settings (on 2 GPUs:
  vLLM on one, the learner on the other, NCCL weight sync). Tokens of a step = its samples x
  `rollout/response_length`; time = `time/step` (wall between steps).
- TRL: `GRPOTrainer` on the same checkpoint and the same prompts (as chat messages, so both apply the
  model's chat template), rewards from our scorers through the same `rewards.pool.ScoringPool` and spec
  (`rewards.*` of the config), `num_generations` = n, one optimiser step per generation of prompts x n
  completions (micro-batches as ours), `beta` = 0 (ours keeps its per-domain KL), gradient checkpointing
  off as ours. GPU (`--gpu`): vLLM in server mode on the second GPU (`trl vllm-serve`), the trainer on the
  first, bf16. `--gpu --colocate`: one GPU for both sides; TRL's vLLM in colocate mode (in the trainer's
  process) with ours' resolved `rollout.gpu_memory_utilization` and `max_model_len`; ours with the engine and
  the learner sharing the GPU (auto placement). CPU: TRL generates with transformers (no vLLM), fp32: a smoke
  test of this script, not a comparison. Tokens of a step = `completions/mean_length` x completions; time =
  wall between steps.

    python bench/e2e_vs_trl.py --gpu --steps 25 [--prompts 32 --n 8 --max-tokens 256] [rl.train overrides ...]
    python bench/e2e_vs_trl.py --gpu --colocate --steps 25   # one GPU (not issue 19's 2-GPU target)
    python bench/e2e_vs_trl.py --steps 4 --prompts 4 --n 4 --max-tokens 16 rollout=reference   # CPU smoke test

Not covered: DeepSpeed/FSDP in TRL (one process); TRL's sleep mode; the two runs' rewards are not compared
(their prompt orders differ).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def common(a) -> list[str]:
    """The shared settings as rl.train overrides (TRL's side is derived from the same resolved config)."""
    return ["--config-name", "quickstart", "distill.enabled=false", "data.eval=null", "trainer.eval_every=0",
            "trainer.save_every=0", "logging.wandb=false", "logging.plots=false", f"trainer.steps={a.steps}",
            f"data.prompts_per_step={a.prompts}", f"rollout.n={a.n}", f"rollout.max_tokens={a.max_tokens}",
            *(["rollout=vllm"] if a.gpu else []), *a.overrides]


def per_second(tokens: list[float], seconds: list[float], warmup: int) -> dict:
    t, s = tokens[warmup:], seconds[warmup:]
    return {"tokens_per_s": sum(t) / sum(s), "steps": len(s), "step_s": [statistics.median(s), min(s), max(s)]}


def run_ours(a, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "rl.train", *common(a), f"trainer.run_dir={run_dir}"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"ours failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    steps = [r for r in rows if "train/loss" in r]
    tokens = [r["rollout/response_length"] * a.prompts * a.n for r in steps]
    out = per_second(tokens, [r["time/step"] for r in steps], a.warmup)
    later = steps[a.warmup:]  # where the step goes (issue 19 item 3: scoring <= 10% of the step)
    out["parts_s"] = {k: statistics.median(r[k] for r in later) for k in sorted(later[0]) if k.startswith("time/")}
    out["score_share"] = statistics.median(r["time/score"] / r["time/step"] for r in later)
    return out


def trl_vllm_args(a, cfg) -> dict:
    """GRPOConfig's vLLM settings: none on CPU, its server on the second GPU, or colocated with ours' engine settings."""
    if not a.gpu:
        return {}
    if a.colocate:
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
                "vllm_max_model_length": cfg.rollout.max_model_len}
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "127.0.0.1", "vllm_server_port": a.port}


def trl_worker(a, out: Path) -> None:
    """Runs in its own process: TRL's GRPOTrainer; writes per-step tokens and seconds to `out`."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rl.components import setup
    from rl.config import load_config

    cfg = load_config(common(a)[2:] + [f"trainer.run_dir={out.parent / 'trl_setup'}"], "quickstart")
    s = setup(cfg)
    chat = lambda x: x if isinstance(x, list) else [{"role": "user", "content": x}]  # noqa: E731
    rows = [{**p.row, "prompt": chat(p.row["prompt"])} for p in s.train_prompts]
    cols = sorted({k for r in rows for k in r if k != "prompt"})
    data = Dataset.from_list([{k: r.get(k) for k in ["prompt", *cols]} for r in rows])

    def reward(prompts, completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = [0.0] * len(texts)
        for domain in set(kw["domain"]):
            idx = [i for i, d in enumerate(kw["domain"]) if d == domain]
            spec = s.specs[domain]
            vecs = s.pool.score(spec, [texts[i] for i in idx], {c: [kw[c][i] for i in idx] for c in cols if c in kw})
            for i, v in zip(idx, vecs):
                out[i] = spec.combine(v) or 0.0
        return out

    micro = min(cfg.trainer.micro_batch_size, a.prompts * a.n)
    args = GRPOConfig(
        output_dir=str(out.parent / "trl_out"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.prompts * a.n // micro, num_generations=a.n, max_completion_length=a.max_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, learning_rate=cfg.trainer.lr, beta=0.0,
        max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[], seed=cfg.trainer.seed,
        gradient_checkpointing=False, use_cpu=not a.gpu, bf16=a.gpu, **trl_vllm_args(a, cfg))
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=s.model_path, reward_funcs=[reward], args=args, train_dataset=data, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    seconds = [m - p for m, p in zip(marks, [t0, *marks[:-1]])]
    out.write_text(json.dumps({"tokens": [x * a.prompts * a.n for x in lengths], "seconds": seconds,
                               "device": torch.cuda.get_device_name(0) if a.gpu else "CPU"}))


def run_trl(a, work: Path) -> dict:
    server = None
    env = dict(os.environ)
    if a.gpu and not a.colocate:
        from rl.components import setup
        from rl.config import load_config

        model = setup(load_config(common(a)[2:] + [f"trainer.run_dir={work / 'trl_setup'}"], "quickstart")).model_path
        serve = [sys.executable, "-m", "trl.scripts.vllm_serve", "--model", model, "--port", str(a.port),
                 "--max-model-len", "2048", "--gpu-memory-utilization", "0.85"]
        server = subprocess.Popen(serve, env={**env, "CUDA_VISIBLE_DEVICES": "1"},
                                  stdout=open(work / "vllm_serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        env["CUDA_VISIBLE_DEVICES"] = "0"
    try:
        out = work / "trl.json"
        cmd = [sys.executable, __file__, "--trl-worker", str(out), *sys.argv[1:]]
        log = work / "trl_worker.log"
        with open(log, "w") as f:
            worker = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            while worker.poll() is None:  # the worker would wait for a dead server until its own timeout
                if server is not None and server.poll() is not None:
                    worker.kill()
                    tail = (work / "vllm_serve.log").read_text()[-3000:]
                    raise SystemExit(f"TRL's vLLM server exited (rc {server.returncode}):\n{tail}")
                time.sleep(2)
        if worker.returncode != 0:
            raise SystemExit(f"TRL failed:\n{log.read_text()[-5000:]}")
        got = json.loads(out.read_text())
        return per_second(got["tokens"], got["seconds"], a.warmup)
    finally:
        if server is not None:
            os.killpg(server.pid, 9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out (compile, caches, the first sync)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--colocate", action="store_true", help="--gpu on one GPU: TRL's colocated vLLM vs ours sharing it")
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="rl.train overrides for both sides (model, rewards, ...)")
    a = p.parse_args()
    if a.colocate and not a.gpu:
        raise SystemExit("--colocate needs --gpu (one GPU for both sides)")
    if a.colocate:  # both sides see one GPU: ours' auto placement shares it
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    if a.trl_worker:
        trl_worker(a, Path(a.trl_worker))
        return
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-trl-"))
    res = {"ours": run_ours(a, work / "ours")}
    print(f"ours done: {res['ours']}", flush=True)  # kept in the log if TRL's side fails
    res["trl"] = run_trl(a, work)
    print(f"{' '.join(sys.argv)}\n{a.steps} steps ({a.warmup} warm-up left out), {a.prompts} prompts x n={a.n}, "
          f"max {a.max_tokens} new tokens")
    for k, r in res.items():
        med, lo, hi = r["step_s"]
        print(f"  {k:4s}: {r['tokens_per_s']:10,.0f} trained tokens/s; step s median {med:.2f} [{lo:.2f}, {hi:.2f}] over {r['steps']}")
    parts = ", ".join(f"{k[5:]} {v:.2f}" for k, v in res["ours"]["parts_s"].items())
    print(f"  ours' step parts, median s: {parts}; scoring {res['ours']['score_share']:.1%} of the step (target <= 10%)")
    where = "one GPU, colocated" if a.colocate else "2 GPUs" if a.gpu else "CPU smoke test"
    print(f"  ratio ours / TRL ({where}): {res['ours']['tokens_per_s'] / res['trl']['tokens_per_s']:.2f}x (target >= 1.5x on 2 GPUs)")
    (Path(os.environ.get("OUT", work)) / "e2e_vs_trl.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
