"""Running scorers with time limits that work anywhere: main thread, worker threads, Ray actors.

`signal.alarm` only works in the main thread of the main interpreter, and a thread cannot be killed, so
the limit is enforced on a forked child process that is killed when it overruns. A batch is scored in one
child (fast path); if that child times out or crashes, the batch is re-scored one completion per child so
that only the culprit gets None. Every None produced here is counted in `rewards.base.EVENTS`.

The children are pre-started: each scorer's process is forked at its first batch (after the scorer was
warmed: math-verify's imports, lingua's detectors) and serves later batches until it overruns or dies, when it
is killed and the next batch forks a new one, or for at most `MAX_BATCHES` batches. A fork from the driver
costs 22-33 ms, against scorers that take about 0.5 ms a completion (bench/README.md). What a scorer keeps
in its module (caches, state) lasts as long as its process; scorers are meant to be pure functions of their
arguments. `prestart=False` forks a child per call.

A scorer that raises gets its traceback printed to stderr once per scorer name and process (the first
one; later ones are only counted as `<scorer>:exception`), so a bug in a reward function is seen at once
rather than as a rising abstention count.

`ScoringPool` is the in-process executor (tests, laptops, inside a Ray actor); `RayScoringPool` spreads
batches over Ray actors that each hold a `ScoringPool`.
"""
from __future__ import annotations

import contextvars
import functools
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rewards.base import (
    _SINK,
    EVENTS,
    ScorerError,
    call_scorer,
    collect_events,
    get_scorer,
    merge_events,
    record_event,
    warm_scorer,
)
from rewards.spec import RewardSpec


@dataclass(frozen=True)
class CallResult:
    ok: bool
    value: object = None  # the scores when ok
    error: str = ""  # "timeout", "crashed (exit N)" or the exception's traceback


def _reply(fn, *args, **kwargs) -> tuple:
    """In a child: `fn(*args, **kwargs)` as the parent's `_result` reads it, (ok, value or ScorerError or
    traceback, the events counted meanwhile)."""
    EVENTS.clear()
    try:
        return True, fn(*args, **kwargs), dict(EVENTS)
    except ScorerError as exc:  # a contract violation is a bug to surface, not a sample to skip
        return False, exc, dict(EVENTS)
    except BaseException:  # noqa: BLE001  report anything, including SystemExit from user code
        return False, traceback.format_exc(limit=5), dict(EVENTS)


def _child(conn, fn, args, kwargs):
    os.setpgrp()  # so a scorer's own subprocesses die with it
    _SINK.set(None)  # the child counts into its own EVENTS, which travel back to the parent with the result
    try:
        conn.send(_reply(fn, *args, **kwargs))
    except BaseException:  # noqa: BLE001  the reply could not be sent (a value that does not pickle)
        conn.send((False, traceback.format_exc(limit=5), dict(EVENTS)))
    finally:
        conn.close()


def _fork(ctx, send, fn, args, kwargs, attempts: int = 100, target=None):
    """Start the child (`target(send, fn, args, kwargs)`, `_child` by default). filelock >= 3.3x refuses os.fork
    (RuntimeError from an audit hook) while another thread is inside a lock's descriptor hand-over; that window
    is short, so try again a moment later."""
    for attempt in range(attempts):
        proc = ctx.Process(target=target or _child, args=(send, fn, args, kwargs), daemon=True)
        try:
            proc.start()
            return proc
        except RuntimeError as exc:
            if "fork is unsafe" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.01)


def _result(ok: bool, value, events: dict) -> CallResult:
    """A child's reply (`_child`, `_serve`) in the parent: its events counted here, a contract violation raised."""
    merge_events(events)
    if isinstance(value, ScorerError):
        raise value
    return CallResult(ok, value if ok else None, "" if ok else value)


def call_with_timeout(fn, args: tuple, kwargs: dict, timeout_s: float) -> CallResult:
    """Run fn(*args, **kwargs) in a forked child; kill its process group after `timeout_s`."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = _fork(ctx, send, fn, args, kwargs)
    send.close()
    try:
        if not recv.poll(timeout_s):
            return CallResult(False, error="timeout")
        return _result(*recv.recv())
    except EOFError:
        proc.join(1)
        return CallResult(False, error=f"crashed (exit {proc.exitcode})")
    finally:
        recv.close()
        _kill(proc)


def _kill(proc) -> None:
    """Kill a child's process group (its scorer's subprocesses too) and reap it."""
    if proc.exitcode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # not yet its own group leader
            proc.kill()
    proc.join()


def _serve(conn, name, parent: int, _kwargs):
    """A pre-started scorer process: scores the batches of scorer `name` sent over `conn` until the pipe closes
    or the parent (pid `parent`) is gone. Replies as `_child` does; a batch that raises leaves it serving. Each
    batch comes with its time limit, enforced here too (SIGALRM, default action: the process ends) for when the
    parent died and cannot kill it."""
    import gc

    os.setpgrp()  # so a scorer's own subprocesses die with it
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):  # not the driver's handlers (rl.train's Stop
        signal.signal(sig, signal.SIG_DFL)  # would make it ignore multiprocessing's SIGTERM at exit)
    gc.freeze()  # the driver's objects, inherited: collections here would touch (and copy) all their pages
    _SINK.set(None)
    scorer = get_scorer(name)
    while True:
        try:
            while not conn.poll(1.0):  # copies of the parent's pipe ends live in later forks: no EOF when it dies
                if os.getppid() != parent:
                    return
            args, completions, rows, timeout_s = conn.recv()
        except EOFError:
            return
        fn = functools.partial(scorer, **args) if args else scorer
        signal.alarm(int(timeout_s) + 5)
        reply = _reply(call_scorer, name, fn, completions, **rows)  # scores are floats (check_scores): they pickle
        signal.alarm(0)
        conn.send(reply)


class _Worker:
    """One pre-started process of one scorer (`_serve`), forked after the scorer was warmed. `clean`: the last
    batch got its whole reply (the pipe holds nothing stale), so the process may serve another one."""

    def __init__(self, name: str):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = _fork(ctx, child, name, os.getpid(), None, target=_serve)
        child.close()
        self.batches, self.clean = 0, True

    def call(self, args: dict, completions: list[str], rows: dict[str, list], timeout_s: float) -> CallResult:
        """Score one batch; on a time-out or a crash the process is killed (`alive` is then False). Raises
        what pickling the batch raises (nothing was sent then)."""
        from multiprocessing.reduction import ForkingPickler

        data = bytes(ForkingPickler.dumps((args, completions, rows, timeout_s)))
        self.clean, self.batches = False, self.batches + 1
        try:
            self.conn.send_bytes(data)
            deadline = time.monotonic() + timeout_s
            # In slices: a later fork may hold a copy of this pipe's child end, so a dead process gives no EOF.
            while not self.conn.poll(min(0.5, max(deadline - time.monotonic(), 0))):
                if not self.proc.is_alive():
                    raise EOFError
                if time.monotonic() >= deadline:
                    self.kill()
                    return CallResult(False, error="timeout")
            reply = self.conn.recv()
        except (EOFError, OSError):  # died (os._exit, a signal, the OOM killer), or between batches
            self.kill()
            return CallResult(False, error=f"crashed (exit {self.proc.exitcode})")
        self.clean = True
        return _result(*reply)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        _kill(self.proc)
        self.conn.close()


KEEP_IDLE = 2  # pre-started processes kept per scorer between batches
# Batches one process serves before it is replaced: bounds what it carries from step to step (the driver's
# pages it copied as the driver changed them, a scorer's caches and module state) at one fork per this many.
MAX_BATCHES = 32
_SHOWN: set[str] = set()  # scorers whose first traceback was printed
_SHOWN_LOCK = threading.Lock()


def show_first_traceback(name: str, tb: str) -> None:
    """Print a scorer's traceback to stderr the first time it raises in this process."""
    with _SHOWN_LOCK:
        if name in _SHOWN:
            return
        _SHOWN.add(name)
    print(f"rewards: scorer '{name}' raised; its completions get None (abstain), counted as events/{name}:exception. "
          f"First traceback (later ones are only counted):\n{tb.rstrip()}", file=sys.stderr, flush=True)


class ScoringPool:
    """Scores batches against reward specs with a per-call time limit.

    `timeout_s` bounds one scorer call on one completion (a batch of n gets n * timeout_s on the fast path);
    the driver sets it from the config. `isolate=False` calls scorers in-process without any limit (for
    debugging with breakpoints).
    """

    def __init__(self, timeout_s: float = 30.0, threads: int = 4, isolate: bool = True, prestart: bool = True):
        if not timeout_s > 0:
            raise ValueError(f"scoring time-out must be > 0 seconds, got {timeout_s}")
        self.timeout_s, self.isolate, self.prestart = timeout_s, isolate, prestart
        self._threads = ThreadPoolExecutor(max_workers=threads)
        self._idle: dict[str, list[_Worker]] = {}  # scorer -> its pre-started processes not scoring now
        self._lock = threading.Lock()

    def _call(self, name: str, args: dict, fn, completions: list[str], rows: dict[str, list]) -> CallResult:
        """One batch in a child under the time limit: a pre-started process of the scorer (forked at its first
        batch, kept while it answers in time), or with `prestart=False` a child forked for this call."""
        timeout_s = self.timeout_s * len(completions)
        fork = functools.partial(call_with_timeout, call_scorer, (name, fn, completions), rows, timeout_s)
        if not self.prestart:
            return fork()
        with self._lock:
            idle = self._idle.setdefault(name, [])
            worker = idle.pop() if idle else None
        if worker is not None and not worker.alive:
            worker.kill()  # reap it
            worker = None
        worker = worker or _Worker(name)
        try:
            return worker.call(args, completions, rows, timeout_s)
        except (pickle.PicklingError, TypeError, AttributeError):
            if worker.clean:  # the batch could not be pickled (nothing sent): the fork inherits it instead
                return fork()
            raise
        finally:  # kept for the next batch unless killed, used up, or enough are idle (a batch's per-completion
            with self._lock:  # re-scoring runs up to 16 at once)
                idle = self._idle.setdefault(name, [])
                keep = worker.alive and worker.clean and worker.batches < MAX_BATCHES and len(idle) < KEEP_IDLE
                if keep:
                    idle.append(worker)
            if not keep:
                worker.kill()

    def close(self) -> None:
        """Stop the pre-started processes (they are daemons: they also end with this process)."""
        with self._lock:
            workers, self._idle = [w for ws in self._idle.values() for w in ws], {}
        for w in workers:
            w.kill()

    def run_scorer(self, name: str, args: dict, completions: list[str], rows: dict[str, list]) -> list[float | None]:
        fn = functools.partial(get_scorer(name), **args) if args else get_scorer(name)
        if not self.isolate:
            return call_scorer(name, fn, completions, **rows)
        return self._run_isolated(name, args, fn, completions, rows)

    def _run_isolated(self, name: str, args: dict, fn, completions: list[str], rows: dict[str, list]) -> list[float | None]:
        res = self._call(name, args, fn, completions, rows)
        if res.ok:
            return res.value
        if res.error != "timeout" and not res.error.startswith("crashed"):
            show_first_traceback(name, res.error)
        if len(completions) == 1:
            reason = res.error if res.error == "timeout" or res.error.startswith("crashed") else "exception"
            record_event(name, reason.split(" (")[0])
            return [None]
        # Isolate the culprit(s): one child per completion, in threads of their own: the pool's threads may all
        # be dimensions waiting here (queued behind them, the completions would never run).
        one = lambda i: self._run_isolated(name, args, fn, [completions[i]], {k: [v[i]] for k, v in rows.items()})  # noqa: E731
        with ThreadPoolExecutor(max_workers=min(16, len(completions))) as ex:
            futures = [ex.submit(contextvars.copy_context().run, one, i) for i in range(len(completions))]
            return [s for f in futures for s in f.result()]

    def score(self, spec: RewardSpec, completions: list[str], rows: dict[str, list]) -> list[dict[str, float | None]]:
        """One reward vector (dimension -> score or None) per completion; dimensions scored concurrently."""
        self.warm(spec)
        # Each thread runs in a copy of the caller's context: its events reach the caller's collect_events().
        futures = {d.name: self._threads.submit(contextvars.copy_context().run, self.run_scorer, d.scorer, d.args, completions, rows)
                   for d in spec.dimensions}
        cols = {name: f.result() for name, f in futures.items()}
        return [{name: cols[name][i] for name in cols} for i in range(len(completions))]

    @staticmethod
    def warm(spec: RewardSpec) -> None:
        """Warm `spec`'s scorers in this process: imports and models built here once are inherited by every
        forked child. Call it before scoring from several threads: a fork while another thread is importing
        can leave the child holding that module's import lock."""
        for d in spec.dimensions:
            warm_scorer(d.scorer)

    def score_remote(self, spec: RewardSpec, completions: list[str], rows: dict[str, list]):
        """`score` plus the events it counted, for a caller in another process (a Ray actor's client)."""
        with collect_events() as events:
            vectors = self.score(spec, completions, rows)
        return vectors, dict(events)


class RayScoringPool:
    """`ScoringPool`s in `num_actors` Ray actors; batches are split across them.

    The per-call limits run inside the actors (fork works there); the outer `ray.get` has a generous
    safety timeout after which the actor is killed, replaced, and its slice gets None (counted).
    """

    def __init__(self, num_actors: int = 2, timeout_s: float = 30.0, num_cpus: float = 0.5):
        import ray

        self._ray = ray
        self._cls = ray.remote(num_cpus=num_cpus)(ScoringPool)
        self.timeout_s = timeout_s
        self.actors = [self._cls.remote(timeout_s) for _ in range(num_actors)]
        self._replacing = threading.Lock()  # domains are scored from several threads (rl.pipeline.score)

    @staticmethod
    def warm(spec: RewardSpec) -> None:
        """Nothing to warm here: each actor's `ScoringPool` warms its scorers in its own process."""

    def score(self, spec: RewardSpec, completions: list[str], rows: dict[str, list]) -> list[dict[str, float | None]]:
        n, k = len(completions), len(self.actors)
        bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        actors = list(self.actors)
        refs = [a.score_remote.remote(spec, completions[s:e], {c: v[s:e] for c, v in rows.items()})
                for a, (s, e) in zip(actors, bounds)]
        out: list[dict[str, float | None]] = []
        for i, (ref, (s, e)) in enumerate(zip(refs, bounds)):
            try:
                # Worst case inside: the batch, then each completion, per dimension, all sequential.
                vectors, events = self._ray.get(ref, timeout=self.timeout_s * 2 * max(e - s, 1) * len(spec.dimensions) + 30)
                merge_events(events)
                out.extend(vectors)
            except Exception as exc:  # noqa: BLE001  a dead or hung actor: replace it (once), count the loss
                with self._replacing:
                    if self.actors[i] is actors[i]:
                        self._ray.kill(actors[i])
                        self.actors[i] = self._cls.remote(self.timeout_s)
                record_event("pool", f"actor_failed:{type(exc).__name__}", e - s)
                out.extend({d.name: None for d in spec.dimensions} for _ in range(e - s))
        return out
