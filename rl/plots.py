"""The run's PNG plots, drawn from metrics.jsonl: `python -m rl.plots RUN_DIR [--out DIR]`.

The driver draws them at the end of a run (`logging.plots`); this redraws them at any time, also for a run
that crashed or is still running: a last line cut off by a crash is left out (`read_jsonl`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PLOTS = {  # file -> which metrics it draws
    "reward.png": lambda k: k.startswith("reward/"),
    "kl.png": lambda k: k in ("train/kl", "train/mismatch_kl"),
    "response_length.png": lambda k: k.startswith(("rollout/", "eval/")) and k.endswith("response_length"),
    "opsm.png": lambda k: k == "train/opsm_masked_frac",
    "eval.png": lambda k: k.startswith("eval/") and not k.endswith("response_length"),
}


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log. A last line that is not whole JSON (the process died while writing it) is
    left out; a broken line before it is an error naming the line (the file was damaged otherwise)."""
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
    return rows


def draw(history: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per entry of PLOTS that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for name, wanted in PLOTS.items():
        keys = sorted({k for h in history for k in h if wanted(k) and isinstance(h[k], (int, float))})
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            pts = [(h["step"], h[k]) for h in history if h.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=2, label=k)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        out.append(out_dir / name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Redraw a run's plots from its metrics.jsonl (a crashed run's too).")
    p.add_argument("run_dir")
    p.add_argument("--out", help="where to write the PNGs (default: the run dir)")
    a = p.parse_args(argv)
    metrics = Path(a.run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        print(f"error: {metrics}: no such file (is {a.run_dir} a run dir, trainer.run_dir?)", file=sys.stderr)
        return 2
    try:
        history = read_jsonl(metrics)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(a.out or a.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = draw(history, out)
    print(f"{len(history)} rows of {metrics}: " + (", ".join(str(p) for p in written) or "nothing to plot"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
