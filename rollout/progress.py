"""Progress bars (tqdm) for the long stages: generation chunks, distillation, evaluation.

`logging.progress=false` turns them off for the process (`enable(False)`, called by `rl.train` / `rl.eval`
once the config is loaded). tqdm's own TQDM_DISABLE cannot do it: tqdm reads it when it is imported, before
any config exists. Bars go to stderr; when stderr is not a terminal (a log file, a cluster job) they redraw
at most every 30 s instead of 10 times a second (a line per 30 s in the log, not thousands), and transient
bars (a generation call's) are not drawn.
"""
from __future__ import annotations

import sys

_enabled = True


def enable(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def bar(total: int, desc: str, unit: str = "it", leave: bool = True):
    """A tqdm bar (a disabled one when progress is off: `update` and `close` still work)."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    # A transient bar (leave=False: one per generate call) only means something on a terminal.
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not _enabled or (not leave and not tty), file=sys.stderr,
                mininterval=0.1 if tty else 30.0, dynamic_ncols=tty)
