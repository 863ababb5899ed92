"""Code-scorer throughput: programs per second through the new sandbox vs the old path, side by side.

New: `rewards.sandbox.run_tests` (bubblewrap namespaces, per-run cgroup, trusted harness with the solution
in a separate process). Old: the sandbox as of commit e659378 (one subprocess running "program + asserts"
with rlimits and an audit hook), loaded from git so that no copy of it lives in the tree. Both score the
same MBPP-style programs (a correct one, a wrong one, one that loops until the time-out is not included:
it would only measure the time-out) with `--workers` threads (default 2, the cores of the CI machine).
Reps are interleaved (old, new, old, new, ...); prints the median, min and max over reps.

    python bench/sandbox_throughput.py [--reps 5] [--programs 24] [--workers 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "e659378"

PROGRAMS = [  # (solution, tests, expected verdict)
    ("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], True),
    ("def rev(s):\n    return s[::-1]\n", ["assert rev('abc') == 'cba'", "assert rev('') == ''"], True),
    ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     ["assert fib(10) == 55", "assert fib(1) == 1", "assert [fib(i) for i in range(5)] == [0, 1, 1, 2, 3]"], True),
    ("def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n",
     ["assert is_prime(7)", "assert not is_prime(9)", "assert is_prime(2)"], True),
    ("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3"], False),
    ("import collections\ndef counts(xs):\n    return dict(collections.Counter(xs))\n",
     ["assert counts('aab') == {'a': 2, 'b': 1}"], True),
]


def load_old():
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:rewards/sandbox.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="old-sandbox-")) / "old_sandbox.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--programs", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    from rewards.sandbox import SandboxLimits, cgroup_parents, namespaces_available, run_tests

    old = load_old()
    limits = SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=1024)
    old_limits = old.SandboxLimits(timeout_s=5.0, cpu_s=5, memory_mb=1024)
    jobs = [PROGRAMS[i % len(PROGRAMS)] for i in range(a.programs)]

    def new_one(job):
        return run_tests(job[0], job[1], limits).all_passed == job[2]

    def old_one(job):
        return old.run_python(job[0] + "\n\n" + "\n".join(job[1]), old_limits).ok == job[2]

    def rate(fn) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.workers) as ex:
            right = list(ex.map(fn, jobs))
        dt = time.perf_counter() - t0
        assert all(right), "a verdict differs from the expected one"
        return len(jobs) / dt

    print(f"namespaces: {namespaces_available() or 'yes'}; cgroups: {sorted(cgroup_parents()) or 'none'}; "
          f"{a.programs} programs x {a.reps} reps, {a.workers} workers")
    new_one(jobs[0]), old_one(jobs[0])  # warm-up (bwrap probe, imports)
    olds, news = [], []
    for _ in range(a.reps):
        olds.append(rate(old_one))
        news.append(rate(new_one))
    ratios = [n / o for n, o in zip(news, olds)]
    for name, xs in (("old (e659378)", olds), ("new", news)):
        print(f"{name:>14}: {statistics.median(xs):6.1f} programs/s (min {min(xs):.1f}, max {max(xs):.1f})")
    print(f"new/old ratio: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
