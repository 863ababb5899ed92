"""Run-directory logging: metrics.jsonl (always), the evaluations' sampled completions (completions.jsonl
and a wandb.Table), W&B (offline by default; run name, group and tags from `logging.*`), PNG plots
(`rl.plots`), a summary table.

Secrets never reach the run dir: the config logged is the validated schema (it has no secret fields), and
nothing from the environment is written. W&B goes online only with `logging.wandb_mode=online` (and the
usual WANDB_API_KEY in the environment, which W&B reads itself); the run's URL is printed then.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from rl.plots import draw, read_jsonl


class Completions(list):
    """An evaluation's sampled completions (one dict each: domain, prompt, completion, reward, and the reward
    dimensions as `reward/<name>`), carried in a metrics row: `Tracker.log` writes them to completions.jsonl
    and a wandb.Table, never to metrics.jsonl."""

    @classmethod
    def of(cls, samples) -> "Completions":
        return cls({"domain": s.domain, "prompt": _prompt_text(s.metadata.get("prompt")), "completion": s.text or "",
                    "reward": s.reward, **{f"reward/{k}": v for k, v in sorted((s.rewards or {}).items())}}
                   for s in samples)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # chat messages
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    return str(prompt or "")


class Tracker:
    def __init__(self, run_dir: str, cfg, resume_step: int | None = None):
        """`resume_step`: the checkpoint's step; rows logged after it (by the run that died) are dropped,
        since those steps run again. None: a fresh run (old files are removed)."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.path, self.consumed_path = self.dir / "metrics.jsonl", self.dir / "consumed.jsonl"
        self.completions_path = self.dir / "completions.jsonl"
        for p in (self.path, self.consumed_path, self.completions_path):
            # A crash can cut the last line short; read_jsonl leaves it out and the rewrite drops it.
            rows = read_jsonl(p) if resume_step is not None else []
            p.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= (resume_step or 0)))
        self.history: list[dict] = read_jsonl(self.path)
        resume = resume_step is not None
        self.wandb = None
        lg = cfg.logging
        if lg.wandb and lg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=lg.project, dir=str(self.dir), mode=lg.wandb_mode, config=_plain(asdict(cfg)),
                                    name=lg.run_name or self.dir.resolve().name, group=lg.group, tags=list(lg.tags),
                                    resume="allow" if resume else None, id=_run_id(self.dir), reinit="finish_previous")
            if lg.wandb_mode == "online":
                print(f"wandb: {self.wandb.url}", flush=True)

    def log(self, step: int, metrics: dict) -> None:
        tables = {k: v for k, v in metrics.items() if isinstance(v, Completions)}
        row = {"step": step, **{k: _num(v) for k, v in metrics.items() if k not in tables}}
        self.history = [h for h in self.history if h["step"] != step or h.get("_kind") != row.get("_kind")] + [row]
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps({"step": step, **c}) + "\n" for comps in tables.values() for c in comps)
        if self.wandb is not None:
            logged = {k: v for k, v in row.items() if k != "_kind" and v is not None}
            self.wandb.log({**logged, **{k: _table(c) for k, c in tables.items() if c}}, step=step)

    def log_consumed(self, step: int, sources: list[str]) -> None:
        """Which prompts (file:row) a trained step consumed: resume tests compare these multisets."""
        with open(self.consumed_path, "a") as f:
            f.write(json.dumps({"step": step, "prompts": sources}) + "\n")

    def plots(self) -> list[Path]:
        return draw(self.history, self.dir)

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


def _table(completions: Completions):
    import wandb

    columns = list(dict.fromkeys(k for c in completions for k in c))  # every row's keys, first-seen order
    return wandb.Table(columns=columns, data=[[c.get(k) for k in columns] for c in completions])


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
