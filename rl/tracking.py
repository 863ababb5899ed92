"""Run-directory logging: metrics.jsonl (always), W&B (offline by default), PNG plots, a summary table.

Secrets never reach the run dir: the config logged is the validated schema (it has no secret fields), and
nothing from the environment is written. W&B goes online only with `logging.wandb_mode=online` (and the
usual WANDB_API_KEY in the environment, which W&B reads itself).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

PLOTS = {  # file -> which metrics it draws
    "reward.png": lambda k: k.startswith("reward/"),
    "kl.png": lambda k: k in ("train/kl", "train/mismatch_kl"),
    "response_length.png": lambda k: k.startswith(("rollout/", "eval/")) and k.endswith("response_length"),
    "opsm.png": lambda k: k == "train/opsm_masked_frac",
    "eval.png": lambda k: k.startswith("eval/") and not k.endswith("response_length"),
}


class Tracker:
    def __init__(self, run_dir: str, cfg, resume_step: int | None = None):
        """`resume_step`: the checkpoint's step; rows logged after it (by the run that died) are dropped,
        since those steps run again. None: a fresh run (old files are removed)."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.path, self.consumed_path = self.dir / "metrics.jsonl", self.dir / "consumed.jsonl"
        for p in (self.path, self.consumed_path):
            rows = [json.loads(l) for l in p.read_text().splitlines()] if p.exists() and resume_step is not None else []
            p.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= (resume_step or 0)))
        self.history: list[dict] = [json.loads(l) for l in self.path.read_text().splitlines()]
        resume = resume_step is not None
        self.wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.logging.project, dir=str(self.dir), mode=cfg.logging.wandb_mode,
                                    config=_plain(asdict(cfg)), resume="allow" if resume else None,
                                    id=_run_id(self.dir), reinit="finish_previous")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self.history = [h for h in self.history if h["step"] != step or h.get("_kind") != row.get("_kind")] + [row]
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "_kind" and v is not None}, step=step)

    def log_consumed(self, step: int, sources: list[str]) -> None:
        """Which prompts (file:row) a trained step consumed: resume tests compare these multisets."""
        with open(self.consumed_path, "a") as f:
            f.write(json.dumps({"step": step, "prompts": sources}) + "\n")

    def plots(self) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = []
        for name, wanted in PLOTS.items():
            keys = sorted({k for h in self.history for k in h if wanted(k)})
            if not keys:
                continue
            fig, ax = plt.subplots(figsize=(7, 4))
            for k in keys:
                pts = [(h["step"], h[k]) for h in self.history if h.get(k) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=2, label=k)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(self.dir / name, dpi=100)
            plt.close(fig)
            out.append(self.dir / name)
        return out

    def finish(self) -> None:
        if self.cfg.logging.plots:
            self.plots()
        if self.wandb is not None:
            self.wandb.finish()


def summary_table(history: list[dict], keys: list[str]) -> str:
    """First / last / best of each key over the run, as a fixed-width table."""
    lines = [f"{'metric':40s} {'first':>9s} {'last':>9s} {'max':>9s}"]
    for k in keys:
        vals = [h[k] for h in history if h.get(k) is not None]
        if vals:
            lines.append(f"{k:40s} {vals[0]:9.4f} {vals[-1]:9.4f} {max(vals):9.4f}")
    return "\n".join(lines)


def _num(v):
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return v


def _plain(d):
    return json.loads(json.dumps(d, default=str))


def _run_id(run_dir: Path) -> str:
    f = run_dir / ".wandb_id"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()
