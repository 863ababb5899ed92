"""How the benches print a repeated measurement: median [min, max] (the machines are noisy: one number
alone says little). Imported by the bench scripts as `from benchstats import spread` (a script's folder is
first on sys.path)."""
from __future__ import annotations

import statistics


def spread(values: list[float], fmt: str = ".3f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"
