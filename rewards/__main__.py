"""python -m rewards score --spec <scorer name | spec.yaml | spec.json> [--domain D] data.jsonl

Each JSONL row needs `completion`; its other fields are the scorer's row fields (answer, tests, language,
prompt, rubric, num_tokens, truncated...). Prints one line of scores per row, then a summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rewards import SCORERS, parse_specs, single_scorer_spec, take_events
from rewards.pool import ScoringPool


def load_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
                raise SystemExit(f"{path}:{lineno}: each row needs a string field 'completion'")
            rows.append(row)
    return rows


def load_spec(arg: str, domain: str | None):
    if arg in SCORERS:
        return single_scorer_spec(arg)
    p = Path(arg)
    if not p.is_file():
        raise SystemExit(f"--spec: '{arg}' is neither a registered scorer {SCORERS.names()} nor a file")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(p.read_text())
    else:
        raw = json.loads(p.read_text())
    raw = raw.get("rewards", raw)
    specs = parse_specs(raw, where=f"{arg}:rewards")
    if domain is None and len(specs) > 1:
        raise SystemExit(f"--domain: the spec has several domains {sorted(specs)}; pick one")
    return specs[domain] if domain else next(iter(specs.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewards", description="Score completions from a JSONL file.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--spec", required=True)
    s.add_argument("--domain")
    s.add_argument("--timeout", type=float, default=30.0)
    s.add_argument("data")
    a = p.parse_args(argv)
    spec = load_spec(a.spec, a.domain)
    rows = load_rows(a.data)
    fields = sorted({k for r in rows for k in r} - {"completion"})
    cols = {k: [r.get(k) for r in rows] for k in fields}
    vectors = ScoringPool(timeout_s=a.timeout).score(spec, [r["completion"] for r in rows], cols)
    fmt = lambda x: "None" if x is None else f"{x:.3f}"  # noqa: E731
    for i, v in enumerate(vectors, 1):
        dims = " ".join(f"{k}={fmt(x)}" for k, x in v.items())
        print(f"row {i}: reward={fmt(spec.combine(v))} {dims}")
    print(f"--- {len(rows)} rows, spec '{spec.domain}'")
    for d in spec.dimensions:
        vals = [v[d.name] for v in vectors if v[d.name] is not None]
        mean = sum(vals) / len(vals) if vals else float("nan")
        print(f"{d.name:>12s} ({d.scorer}, w={d.weight}): mean {mean:.3f}, abstained {len(vectors) - len(vals)}")
    rewards = [r for r in (spec.combine(v) for v in vectors) if r is not None]
    print(f"{'reward':>12s}: mean {sum(rewards) / max(len(rewards), 1):.3f} over {len(rewards)} rows")
    events = take_events()
    if events:
        print("events: " + ", ".join(f"{k}={n}" for k, n in sorted(events.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
