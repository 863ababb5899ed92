"""Run model-written Python so that a policy cannot cheat its way to a reward (issue 21).

Two separate guarantees, and how each is kept:

1. Isolation (backend `local`, the default). Every run is a bubblewrap (`bwrap`) sandbox of its own:
   - PID, mount, IPC, UTS, network (no interfaces) and cgroup namespaces; `--die-with-parent`, `--new-session`.
     When the run's first process ends, the kernel kills everything else in its PID namespace, so a
     `setsid` double fork or a sleeping daemon does not outlive the run, and nothing outside is visible
     to it (no pid of a sibling sandbox or of the scorer to signal).
   - Read-only binds of only what Python needs: /usr (and the /bin, /lib* links or dirs), the
     interpreter's prefix, /etc/ld.so.cache. No repo, no /work, no home, no data files.
   - Private, size-limited tmpfs at /tmp (the working directory) and /dev/shm: they vanish with the run.
   - As root: no user namespace; bwrap keeps only CAP_SETUID/CAP_SETGID, which our harness uses to drop
     every process to a uid of its own before any model code runs (uids from 2**31 up, derived from the
     scorer's pid and a slot, so concurrent runs never share one), so RLIMIT_NPROC is per run and a
     process cannot signal, ptrace or read another run's (or the harness's) processes. Without root:
     an unprivileged user namespace (`--unshare-user --disable-userns`); all processes of a run share
     the caller's uid, kept apart from the harness by a seccomp filter (below) rather than by uids.
   - A seccomp filter (x86_64 and aarch64) refuses ptrace, process_vm_readv/writev, bpf,
     perf_event_open, userfaultfd, keyrings, io_uring, unshare/setns/mount.
   - rlimits per process (CPU seconds, address space, file size, no core dumps, process count), and,
     where this host lets us create cgroups (root; v2, or v1 controllers on a hybrid host), a cgroup per
     run with total memory (tmpfs files included), pids and 1 CPU, killed (`cgroup.kill`) and removed
     at the end. Where cgroups are not writable the totals are only the per-process rlimits times the
     process limit; the PID-namespace kill still ends everything.
   - The parent reads results from pipes only; it never opens a path inside the sandbox.
   Where namespaces are unavailable (no bwrap, or bwrap cannot create them) the `local` backend refuses
   to run unless the caller accepts the weaker mode (`allow_weak_sandbox=True` or
   `V32RL_ALLOW_WEAK_SANDBOX=1`): a plain subprocess with the rlimits, a process group and a temp dir,
   plus the cgroup when writable. Nothing else guards that mode; it is for laptops, not training runs.
   The `http` backend sends the same scripts to a SandboxFusion-compatible service (`POST /run_code`);
   its isolation is the service's.

2. Verdicts from outside the program (`run_tests`, and the verifier's harness in `rewards.verifier`).
   A trusted harness (the `_h_*` functions below, shipped into the sandbox as source) forks the
   solution's process *before* it reads the tests from stdin, so that process never holds a test in
   memory, a file or its argv. The solution is exec'd there as module `solution`; the tests run in
   the harness's process, where every solution global they name is a remote object: a call, an
   attribute, an item, `len`, `iter` and `str` are asked of the solution's process over a pipe, and
   only plain values come back (None, bool, int, float, complex, str, bytes, bytearray, list, tuple,
   set, frozenset, dict, checked by exact type, as tagged JSON). So every comparison of a test is made
   by the harness on plain values: an object whose `__eq__` is always true is a remote object, which
   refuses `==`, ordering and truth tests. The solution's process can only choose the values it
   returns. An exit (`sys.exit`, `os._exit`, `raise SystemExit`, an atexit hook), a crash or a hang
   there fails the tests still to run; a missing report or the wall time-out scores 0.0. The harness
   writes its report to its own copy of stdout (fd 1 of every other process is /dev/null), prefixed
   with a per-run random nonce the solution's process never receives; as root the harness runs under a
   different uid than the solution, and the seccomp filter forbids ptrace, so the solution cannot reach
   the harness's memory or descriptors either way.

What is not covered:
- A test's own expression is visible to the solution through the arguments it is called with (a test
  `assert f(x) == y` sends `x`, never `y`). Tests are run as written; they must pass only plain values
  to the solution (a lambda or an instance of a class defined in the test cannot cross), an argument
  changed in place is copied back only when it is a top-level list, dict, set or bytearray, and a plain
  global of the solution is fetched once per test.
- Solution globals that shadow a builtin (`abs`, `sorted`, ...) are not given to the tests.
- Programs get the standard library only (`python -I -S`), without ctypes where the interpreter lacks it.
- Without root all processes of a run share one uid: a program may kill its own harness (its score is
  then 0.0), and in the verifier a verified answer that the verifier executes could end its siblings'
  checks (the weak mode and the `http` backend have the same limit, and the weak mode none of the
  namespaces). CPU time is limited per process and by the wall time-out; timing side channels are not.
"""
from __future__ import annotations

import _json  # noqa: F401  (the shipped harness's imports, also here so that its names resolve for linters)
import _signal  # noqa: F401
import builtins
import contextlib
import functools
import inspect
import json
import os
import platform
import resource
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from rewards.registry import Registry


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock of the run (the harness's own deadline; the parent allows 2 s more)
    cpu_s: int = 5  # RLIMIT_CPU, per process
    memory_mb: int = 1024  # RLIMIT_AS per process, and the cgroup's total (tmpfs files included) where writable
    file_size_mb: int = 16  # RLIMIT_FSIZE
    max_procs: int = 16  # RLIMIT_NPROC of the run's own uid, and the cgroup's pids.max
    disk_mb: int = 64  # size of each private tmpfs: /tmp (the working directory) and /dev/shm


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed by the wall time-out; -N when killed by signal N
    stdout: str  # the last MiB
    stderr: str  # the last 64 KiB
    timed_out: bool
    wall_s: float
    isolation: str  # "namespaces", "weak" (no namespaces, accepted by the caller) or "http"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def limit_hit(self) -> bool:
        """Stopped by a time limit: the wall time-out, or the CPU limit (SIGXCPU at the soft limit, SIGKILL at
        the hard one); under load the CPU limit can come first."""
        return self.timed_out or self.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


class SandboxUnavailable(RuntimeError):
    """The backend refuses to run model code here (no namespaces and the weaker mode not accepted, or the
    remote service failed)."""


# ---------------------------------------------------------------------------------------------------------
# The harness: shipped into the sandbox as source (`harness_script`), so these functions use only the
# standard library, the imports of `_PROLOGUE` and each other. The header line on stdin carries limits and
# uids; everything after it is read only once the solution's process is forked.

# Not `json` (with `re` and `enum` it costs more than a run): its C scanner and string encoder suffice.
# Nor `signal` (it imports `enum`): `_signal` is built in.
_PROLOGUE = "# v32rl-sandbox harness\nimport _json, _signal, builtins, os, resource, select, sys, time\n"


class _JsonContext:  # what `_json.make_scanner` reads from `json.JSONDecoder`
    strict, object_hook, object_pairs_hook, memo = True, None, None, {}
    parse_float, parse_int, parse_constant = float, int, float


def _h_loads(data):
    if type(data) is not str:
        data = data.decode("utf-8")
    data = data.strip()
    try:
        obj, end = _json.make_scanner(_JsonContext())(data, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(data):
        raise ValueError("extra data after JSON")
    return obj


def _h_dumps(x):
    t = type(x)
    if t is str:
        return _json.encode_basestring_ascii(x)
    if x is None or t is bool:
        return {None: "null", True: "true", False: "false"}[x]
    if t is int:
        return int.__repr__(x)
    if t is list or t is tuple:
        return "[" + ",".join([_h_dumps(v) for v in x]) + "]"
    if t is dict:
        return "{" + ",".join([_json.encode_basestring_ascii(str(k)) + ":" + _h_dumps(v) for k, v in x.items()]) + "}"
    raise TypeError(f"cannot send a {t.__name__}")


def _h_read_line(fd):
    buf = bytearray()
    while True:  # byte by byte, so that nothing after the newline is consumed
        b = os.read(fd, 1)
        if b in (b"", b"\n"):
            return bytes(buf)
        buf += b


def _h_read_all(fd, n=-1):
    buf = bytearray()
    while n < 0 or len(buf) < n:
        chunk = os.read(fd, 1 << 16 if n < 0 else min(1 << 16, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _h_limit(res, value):
    hard = resource.getrlimit(res)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(res, (value, value))


def _h_boot():
    """Read the header line and apply the per-process limits (inherited by every later process)."""
    hdr = _h_loads(_h_read_line(0))
    resource.setrlimit(resource.RLIMIT_CPU, (hdr["cpu_s"], hdr["cpu_s"] + 1))
    _h_limit(resource.RLIMIT_AS, hdr["memory_mb"] << 20)
    _h_limit(resource.RLIMIT_FSIZE, hdr["file_size_mb"] << 20)
    _h_limit(resource.RLIMIT_CORE, 0)
    return hdr


def _h_become(uid, max_procs):
    """Drop to the run's `uid` (as root; it must succeed) and cap that uid's process count."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _h_limit(resource.RLIMIT_NPROC, max_procs)


def _h_close_fds(keep):
    """Only `keep` stays open; stdin and stdout go to /dev/null (stderr stays: the parent keeps its tail)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _h_report_channel():
    """A private copy of stdout for the report; fd 1 itself becomes /dev/null."""
    fd = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    return fd


def _h_write(fd, data):
    while data:
        data = data[os.write(fd, data):]


def _h_report(fd, nonce, obj):
    _h_write(fd, (nonce + _h_dumps(obj) + "\n").encode())


def _h_text(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:300]
    except Exception:  # noqa: BLE001  a solution's exception may fail to print itself
        return "an exception that cannot be printed"


def _enc(x, handle):
    """`x` as tagged JSON if it is a plain value (exact types: a subclass is not plain), else `handle(x)`."""
    t = type(x)
    if x is None:
        return ["n"]
    if t is bool:
        return ["b", x]
    if t is int:
        return ["i", hex(x)]  # hex: no digit limit for big ints
    if t is float:
        return ["f", x.hex()]
    if t is complex:
        return ["c", x.real.hex(), x.imag.hex()]
    if t is str:
        return ["s", x]
    if t is bytes or t is bytearray:
        return ["y" if t is bytes else "Y", x.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [_enc(v, handle) for v in x]]
    if t is dict:
        return ["d", [[_enc(k, handle), _enc(v, handle)] for k, v in x.items()]]
    return handle(x)


def _dec(v, resolve):
    """The inverse of `_enc`; handles (`["h", ref, kind]`) go to `resolve`. Anything malformed raises."""
    tag = v[0]
    if tag == "n":
        return None
    if tag == "b" and type(v[1]) is bool:
        return v[1]
    if tag == "i":
        return int(v[1], 16)
    if tag == "f":
        return float.fromhex(v[1])
    if tag == "c":
        return complex(float.fromhex(v[1]), float.fromhex(v[2]))
    if tag == "s" and type(v[1]) is str:
        return v[1]
    if tag in ("y", "Y"):
        return (bytes if tag == "y" else bytearray).fromhex(v[1])
    if tag in ("l", "t", "S", "F"):
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](_dec(e, resolve) for e in v[1])
    if tag == "d":
        return {_dec(k, resolve): _dec(e, resolve) for k, e in v[1]}
    if tag == "h":
        return resolve(v)
    raise ValueError(f"malformed value {str(v)[:80]}")


class _Timeout(BaseException):  # a BaseException, so that a test's `except Exception` does not swallow it
    armed = False  # the alarm raises only while tests run


class _Gone(Exception):
    pass


def _h_on_alarm(signum, frame):
    if _Timeout.armed:
        raise _Timeout()


def _h_arm(deadline):
    _Timeout.armed = True
    _signal.signal(_signal.SIGALRM, _h_on_alarm)
    # Fires again every 0.2 s, in case test code catches everything.
    _signal.setitimer(_signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.001), 0.2)


def _h_serve(rfd, wfd):
    """The solution's process: load the solution, then answer the harness. It never sees a test."""
    objs, ns = [], {"__name__": "solution", "__builtins__": builtins}

    def handle(x):
        objs.append(x)
        try:
            kind = type(x).__name__
        except Exception:  # noqa: BLE001
            kind = "object"
        return ["h", len(objs) - 1, kind if type(kind) is str else "object"]

    def value(v):
        return _dec(v, lambda h: objs[h[1]])

    rfile = os.fdopen(rfd, "rb")
    for line in rfile:
        req = _h_loads(line)
        op, changed = req[0], None
        try:
            if op == "load":
                exec(compile(req[1], "solution.py", "exec"), ns)
                out = [n for n in ns if type(n) is str]
            elif op == "get":
                out = ns[req[1]]
            elif op == "call":
                args = [value(a) for a in req[2]]
                out = objs[req[1]](*args, **{k: value(a) for k, a in req[3].items()})
                changed = {str(i): _enc(a, handle) for i, a in enumerate(args) if type(a) in (list, dict, set, bytearray)}
            elif op == "attr":
                out = getattr(objs[req[1]], req[2])
            elif op == "setattr":
                out = setattr(objs[req[1]], req[2], value(req[3]))
            elif op == "item":
                out = objs[req[1]][value(req[2])]
            elif op == "len":
                out = len(objs[req[1]])
            elif op == "iter":
                out = iter(objs[req[1]])
            elif op == "next":
                try:
                    out = next(objs[req[1]])
                except StopIteration:
                    _h_write(wfd, b'["stop"]\n')
                    continue
            else:  # "str"
                out = str(objs[req[1]])
            reply = ["ok", _enc(out, handle), changed]
        except Exception as exc:  # noqa: BLE001  the harness re-raises it in the test
            reply = ["raise", type(exc).__name__ if type(type(exc).__name__) is str else "Exception", _h_text(exc)]
        _h_write(wfd, (_h_dumps(reply) + "\n").encode())
    os._exit(0)


class _Rpc:
    """The harness's end of the pipes to the solution's process: one request line, one reply line."""

    def __init__(self, wfd, rfd):
        self.wfd, self.rfile = wfd, os.fdopen(rfd, "rb")

    def __call__(self, *req):
        _h_write(self.wfd, (_h_dumps(req) + "\n").encode())
        line = self.rfile.readline()
        if not line.endswith(b"\n"):
            raise _Gone("the solution's process ended")
        reply = _h_loads(line)
        if reply[0] == "ok":
            return reply
        if reply[0] == "stop":
            raise StopIteration
        if reply[0] == "raise":
            exc = getattr(builtins, str(reply[1]), None)
            # Not StopIteration: raised from a call it would end the test's iteration early (`all(map(f, xs))`).
            if isinstance(exc, type) and issubclass(exc, Exception) and not issubclass(exc, (StopIteration, StopAsyncIteration)):
                raise exc(str(reply[2]))
            raise _Gone(str(reply[2]))
        raise _Gone("malformed reply")

    def value(self, v):
        return _dec(v, lambda h: _Remote(self, int(h[1]), str(h[2])))


def _h_ref(x):
    if type(x) is _Remote:
        return ["h", x._ref]
    raise TypeError(f"a {type(x).__name__} cannot be passed to the solution (only plain values and its own objects)")


class _Remote:
    """A solution object as the tests see it. Calls, attributes, items, len, iter and str are asked of the
    solution's process; it is never equal, ordered or truthy: tests compare plain values only."""

    __slots__ = ("_rpc", "_ref", "_kind")

    def __init__(self, rpc, ref, kind):
        object.__setattr__(self, "_rpc", rpc)
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_kind", kind)

    def _ask(self, op, *args):
        return self._rpc.value(self._rpc(op, self._ref, *args)[1])

    def __call__(self, *args, **kwargs):
        reply = self._rpc("call", self._ref, [_enc(a, _h_ref) for a in args], {k: _enc(v, _h_ref) for k, v in kwargs.items()})
        for i, new in (reply[2] or {}).items():  # arguments the solution changed in place
            orig, new = args[int(i)], self._rpc.value(new)
            if type(orig) is type(new) and type(orig) in (list, bytearray):
                orig[:] = new
            elif type(orig) is type(new) and type(orig) in (dict, set):
                orig.clear()
                orig.update(new)
        return self._rpc.value(reply[1])

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("attr", name)

    def __setattr__(self, name, value):
        self._rpc("setattr", self._ref, name, _enc(value, _h_ref))

    def __getitem__(self, key):
        return self._ask("item", _enc(key, _h_ref))

    def __len__(self):
        return self._ask("len")

    def __iter__(self):
        return self._ask("iter")

    def __next__(self):
        return self._ask("next")

    def __str__(self):
        s = self._ask("str")
        if type(s) is not str:
            raise TypeError("__str__ did not return a str")
        return s

    def __repr__(self):
        return f"<solution {self._kind}>"

    def __eq__(self, other):
        raise TypeError(f"a solution {self._kind} is not a plain value (int, str, list, ...): it is not compared")

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError(f"a solution {self._kind} is not a plain value (int, str, list, ...): it has no truth value")


def _h_names(code):
    names = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            names |= _h_names(c)
    return names


def _h_run_tests(rpc, solution, tests):
    """Each test runs here, in the harness's process; the solution's globals it names are `_Remote`s."""
    try:
        names = {n for n in rpc.value(rpc("load", solution)[1]) if type(n) is str}
    except _Timeout:
        raise
    except BaseException as exc:  # noqa: BLE001  a syntax error, an exception or an exit at import time
        return [[False, "the solution did not load: " + _h_text(exc)]] * len(tests)
    names = {n for n in names - set(dir(builtins)) if not n.startswith("__")}
    ns = {"__name__": "__test__", "__builtins__": builtins}
    results = []
    for src in tests:
        try:
            code = compile(src, "<test>", "exec")
            for n in _h_names(code) & names:
                if n not in ns:
                    ns[n] = rpc.value(rpc("get", n)[1])
            exec(code, ns)
            results.append([True, ""])
        except _Timeout:
            return results + [[False, "timed out"]] * (len(tests) - len(results))
        except BaseException as exc:  # noqa: BLE001  a failed assert, an error, an exit in the test
            results.append([False, _h_text(exc)])
    return results


def _h_tests_main():
    hdr = _h_boot()
    deadline = time.monotonic() + hdr["timeout_s"]
    uids = hdr["uids"] or [None, None]
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # before the tests are read: this process never holds them
        _h_close_fds({req_r, rep_w})
        _h_become(uids[0], hdr["max_procs"])
        _h_serve(req_r, rep_w)
    os.close(req_r)
    os.close(rep_w)
    out = _h_report_channel()
    _h_become(uids[1], hdr["max_procs"])
    body = _h_loads(_h_read_all(0))
    _h_arm(deadline)
    try:
        results = _h_run_tests(_Rpc(req_w, rep_r), body["solution"], body["tests"])
    except _Timeout:
        results = [[False, "timed out"]] * len(body["tests"])
    _Timeout.armed = False
    _h_report(out, body["nonce"], {"tests": results})
    if not hdr["pidns"]:  # nothing else would reap the solution's process: EOF ends it, then we do
        os.close(out)
        os.close(req_w)
        end = time.monotonic() + 0.5
        while time.monotonic() < end and os.waitpid(pid, os.WNOHANG)[0] == 0:
            time.sleep(0.005)
    os._exit(0)  # no interpreter teardown; the solution's process ends with the PID namespace


def _h_script_main():
    """Plain script mode (the `python` tool): the code runs as `__main__`; no verdict."""
    hdr = _h_boot()
    code = _h_read_all(0, hdr["code_len"]).decode("utf-8", "replace")
    _h_become((hdr["uids"] or [None])[0], hdr["max_procs"])
    try:
        exec(compile(code, "main.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001  print the program's traceback without the harness frame
        import linecache
        import traceback  # here: they cost more than a run that does not fail

        linecache.cache["main.py"] = (len(code), None, code.splitlines(True), "main.py")
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.exit(1)


_SHIPPED = (_JsonContext, _h_loads, _h_dumps, _h_read_line, _h_read_all, _h_limit, _h_boot, _h_become, _h_close_fds,
            _h_report_channel, _h_write, _h_report, _h_text, _enc, _dec, _Timeout, _Gone, _h_on_alarm, _h_arm, _h_serve, _Rpc,
            _h_ref, _Remote, _h_names, _h_run_tests)


@functools.lru_cache(maxsize=None)
def harness_script(main, extra: tuple = ()) -> str:
    """The source of a sandbox script: the harness helpers above and `extra`, then `main` (a function
    written against them, e.g. `rewards.verifier._verifier_main`), called."""
    return "\n".join([_PROLOGUE] + [inspect.getsource(obj) for obj in _SHIPPED + tuple(extra) + (main,)]) + f"\n{main.__name__}()\n"


# ---------------------------------------------------------------------------------------------------------
# Backends: run one script with a header line and a payload on stdin.

SANDBOX_BACKENDS: Registry = Registry("sandbox backend")
_WEAK_ENV = "V32RL_ALLOW_WEAK_SANDBOX"
_UID_BASE = 1 << 31


def get_backend(name: str = "local", **options) -> SandboxBackend:
    """A backend by registry name (`local`, `http`); options go to its constructor."""
    return SANDBOX_BACKENDS.get(name)(**options)


def backend_from_options(sandbox: str = "local", sandbox_url: str | None = None,
                         allow_weak_sandbox: bool = False) -> SandboxBackend:
    """The backend from the options every sandboxed scorer and tool takes (one place, so they mean the same)."""
    if sandbox == "local":
        return get_backend("local", allow_weak_sandbox=allow_weak_sandbox)
    return get_backend(sandbox, **({"url": sandbox_url} if sandbox_url else {}))


class SandboxBackend:
    """Runs `script` (Python source) with `header` (a JSON line, completed with the limits) and `payload`
    on stdin; returns what it printed. Never raises for anything the script does."""

    def run(self, script: str, header: dict, payload: bytes, limits: SandboxLimits, wall_s: float) -> SandboxResult:
        raise NotImplementedError


def _header(header: dict, limits: SandboxLimits, uids: list[int] | None) -> bytes:
    full = {**header, "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb,
            "max_procs": limits.max_procs, "uids": uids}
    return json.dumps(full).encode() + b"\n"


_SLOTS = threading.Condition()
_SLOTS_BUSY: set[int] = set()


def _reset_slots() -> None:  # a forked child (the scoring pool's) starts with no run of its own
    global _SLOTS, _SLOTS_BUSY
    _SLOTS, _SLOTS_BUSY = threading.Condition(), set()


os.register_at_fork(after_in_child=_reset_slots)


@contextlib.contextmanager
def _uid_block():
    """16 uids no other live run uses: 2**31 + pid (22 bits) * 256 + slot (4 bits) * 16 + i."""
    with _SLOTS:
        _SLOTS.wait_for(lambda: len(_SLOTS_BUSY) < 16)
        slot = min(set(range(16)) - _SLOTS_BUSY)
        _SLOTS_BUSY.add(slot)
    try:
        base = _UID_BASE + ((os.getpid() & 0x3FFFFF) << 8) + (slot << 4)
        yield [base + i for i in range(16)]
    finally:
        with _SLOTS:
            _SLOTS_BUSY.discard(slot)
            _SLOTS.notify()


# Syscalls the sandbox never needs and that would let one of its processes read or write another's memory
# (ptrace, process_vm_*), or that widen the kernel's attack surface.
_DENIED_SYSCALLS = {
    "x86_64": (0xC000003E, [101, 310, 311, 321, 298, 323, 248, 249, 250, 425, 426, 427, 438, 272, 308, 165]),
    "aarch64": (0xC00000B7, [117, 270, 271, 280, 241, 282, 217, 218, 219, 425, 426, 427, 438, 97, 268, 40]),
}


@functools.lru_cache(maxsize=None)
def _seccomp_program() -> bytes | None:
    """A classic-BPF seccomp filter for bwrap's `--seccomp`: EPERM for `_DENIED_SYSCALLS` and for any
    other architecture's (or x32) system calls; None on other machines."""
    arch = _DENIED_SYSCALLS.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nrs = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    n = len(nrs)
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny), (ld, 0, 0, 0), (jge, n + 1, 0, 0x40000000)]
    prog += [(jeq, n - i, 0, nr) for i, nr in enumerate(nrs)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _sandbox_python() -> tuple[str, str]:
    """(interpreter, the prefix to bind read-only): ours unless `SANDBOX_PYTHON` names another."""
    exe = os.path.realpath(os.environ.get("SANDBOX_PYTHON") or sys.executable)
    prefix = sys.base_prefix if exe == os.path.realpath(sys._base_executable) else os.path.dirname(os.path.dirname(exe))
    return exe, os.path.realpath(prefix)


def _bwrap_argv(limits: SandboxLimits, seccomp_fd: int | None, as_root: bool) -> list[str]:
    exe, prefix = _sandbox_python()
    argv = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "sandbox", "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/"):
        # bwrap would create the missing parents (/root, ...) with the host's modes: open them to the run's uid.
        parents = [os.path.dirname(prefix)]
        while parents[-1] != "/":
            parents.append(os.path.dirname(parents[-1]))
        for d in reversed(parents[:-1]):
            argv += ["--perms", "0755", "--dir", d]
        argv += ["--ro-bind", prefix, prefix]
    size = str(limits.disk_mb << 20)
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", size, "--tmpfs", "/tmp", "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
             "--chdir", "/tmp"]
    if as_root:  # no user namespace: the harness drops every process to a uid of the run's own
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--disable-userns"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--", exe]


_PY_FLAGS = ["-I", "-S", "-B", "-X", "utf8", "-c"]
# With our own interpreter in the sandbox the harness arrives compiled (marshal, ahead of the header on
# stdin): compiling it in every run would cost a third of a run.
_BOOT = """import marshal, os
def _read(n):
    b = b""
    while len(b) < n:
        c = os.read(0, n - len(b))
        if not c:
            raise SystemExit("sandbox: short read")
        b += c
    return b
exec(marshal.loads(_read(int(_read(16)))))
"""


@functools.lru_cache(maxsize=16)
def _compiled(script: str) -> bytes:
    import marshal

    code = marshal.dumps(compile(script, "<harness>", "exec"))
    return b"%16d" % len(code) + code


@functools.lru_cache(maxsize=None)
def namespaces_available() -> str | None:
    """None when bwrap can run our interpreter in namespaces here, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    try:
        res = subprocess.run(_bwrap_argv(SandboxLimits(), None, os.geteuid() == 0) + [*_PY_FLAGS, "pass"],
                             capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap failed: {exc}"
    return None if res.returncode == 0 else f"bwrap failed: {res.stderr.decode(errors='replace').strip()[-300:]}"


# -- cgroups ---------------------------------------------------------------------------------------------

_CGROUP_FILES = {  # kind -> (file, value from limits) to write; a kind is used only where writable
    "v2": lambda lim: [("memory.max", lim.memory_mb << 20), ("memory.swap.max", 0), ("pids.max", lim.max_procs),
                       ("cpu.max", "100000 100000")],
    "memory": lambda lim: [("memory.limit_in_bytes", lim.memory_mb << 20), ("memory.memsw.limit_in_bytes", lim.memory_mb << 20)],
    "pids": lambda lim: [("pids.max", lim.max_procs)],
    "cpu": lambda lim: [("cpu.cfs_period_us", 100000), ("cpu.cfs_quota_us", 100000)],
}
_V2_CONTROLLERS = {"memory", "pids", "cpu"}
_STALE: list[str] = []  # cgroup dirs whose removal failed (still emptying); retried by the next run


@functools.lru_cache(maxsize=None)
def cgroup_parents() -> dict[str, str]:
    """Where per-run cgroups go, by kind: "v2" (our own cgroup in the unified hierarchy; its kill and, when
    it can delegate them, memory/pids/cpu) and the v1 "memory", "pids", "cpu" hierarchies of a hybrid
    host. Only directories we can create children in (root, or a delegated cgroup)."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in (ctrls.split(",") if ctrls else ["v2"]):
                own[c] = path
    found = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _, opts) = left.split(), right.split()[:3]
            root, mnt = fields[3], fields[4]
            kinds = ["v2"] if fstype == "cgroup2" else [k for k in ("memory", "pids", "cpu") if fstype == "cgroup" and k in opts.split(",")]
            for kind in kinds:
                path = own.get(kind)
                if path is None or kind in found or not (path + "/").startswith(root.rstrip("/") + "/"):
                    continue
                parent = os.path.join(mnt, path[len(root.rstrip("/")):].lstrip("/"))
                if os.access(parent, os.W_OK):
                    found[kind] = parent
    if "v2" in found:  # v2 limits only where our cgroup can hand the controllers to children
        try:
            with open(os.path.join(found["v2"], "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            with open(os.path.join(found["v2"], "cgroup.controllers")) as f:
                available = set(f.read().split())
            missing = (_V2_CONTROLLERS & available) - enabled
            if missing:
                with open(os.path.join(found["v2"], "cgroup.subtree_control"), "w") as f:
                    f.write(" ".join("+" + c for c in sorted(missing)))
                enabled |= missing
        except OSError:
            pass
        for c in _V2_CONTROLLERS & enabled:
            found.pop(c, None)  # v2 has it: no v1 group for it
    for parent in found.values():  # groups of scorer processes killed mid-run (a scoring pool's time-out)
        for name in os.listdir(parent):
            owner = name.split("-")[2] if name.startswith("v32rl-sandbox-") else ""
            if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))
    return found


class _Cgroup:
    """The run's cgroups (one per kind in `cgroup_parents()`), with the limits written; `procs` are the
    files the run's first process writes its pid to before it execs bwrap."""

    _counter = iter(range(1 << 62))

    def __init__(self, limits: SandboxLimits):
        self.dirs: list[tuple[str, str]] = []
        for path in list(_STALE):
            with contextlib.suppress(OSError):
                os.rmdir(path)
                _STALE.remove(path)
        name = f"v32rl-sandbox-{os.getpid()}-{next(self._counter)}"
        for kind, parent in cgroup_parents().items():
            path = os.path.join(parent, name)
            try:
                os.mkdir(path)
            except OSError:
                continue
            self.dirs.append((kind, path))
            for fname, value in _CGROUP_FILES[kind](limits):
                target = os.path.join(path, fname)
                if kind != "v2" or fname.split(".")[0] in self._v2_enabled(path):
                    with contextlib.suppress(OSError), open(target, "w") as f:  # memsw, swap: not everywhere
                        f.write(str(value))

    @staticmethod
    def _v2_enabled(path: str) -> set[str]:
        with open(os.path.join(path, "cgroup.controllers")) as f:
            return set(f.read().split())

    @property
    def procs(self) -> list[str]:
        return [os.path.join(p, "cgroup.procs") for _, p in self.dirs]

    def limits_in_force(self) -> set[str]:
        out = set()
        for kind, path in self.dirs:
            out |= ({kind} if kind != "v2" else self._v2_enabled(path) & _V2_CONTROLLERS)
        return out

    def close(self) -> None:
        """Kill whatever is left and remove the groups. bwrap exits as soon as its command does, while the
        kernel is still ending the rest of the PID namespace: waiting here (a few ms) means that when a
        run returns, none of its processes is alive."""
        for kind, path in self.dirs:
            if kind == "v2" and os.path.exists(os.path.join(path, "cgroup.kill")):
                with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.kill"), "w") as f:
                    f.write("1")
        deadline, pause = time.monotonic() + 2.0, 0.0005
        for _, path in self.dirs:
            while True:
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    for pid in _read_pids(os.path.join(path, "cgroup.procs")):  # v1 has no cgroup.kill
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGKILL)
                    if time.monotonic() > deadline:
                        _STALE.append(path)
                        break
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)


def cgroup_limits() -> set[str]:
    """The totals a run's cgroups enforce here: a subset of {"memory", "pids", "cpu"}, plus "kill" where
    a v2 group can be killed as a whole. Empty where no cgroup is writable (no root, no delegation)."""
    cg = _Cgroup(SandboxLimits())
    try:
        return cg.limits_in_force() | ({"kill"} if any(kind == "v2" for kind, _ in cg.dirs) else set())
    finally:
        cg.close()


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


# A shell joins the cgroups, then execs the sandbox: the run's processes are in them from the start.
_JOIN = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'


def _communicate(proc: subprocess.Popen, data: bytes, wall_s: float) -> tuple[bytes, bytes, bool]:
    """Feed stdin and keep the tails of stdout (1 MiB) and stderr (64 KiB) until both close or the wall
    time runs out (then True)."""
    caps = {proc.stdout: 1 << 20, proc.stderr: 1 << 16}
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    deadline = time.monotonic() + wall_s
    pos = 0
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), True
            for key, _ in sel.select(left):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        pos += os.write(f.fileno(), data[pos:pos + (1 << 16)])
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the program closed stdin: the rest is not wanted
                        pos = len(data)
                    if pos >= len(data):
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), 1 << 16)
                if not chunk:
                    sel.unregister(f)
                    continue
                buf = bufs[f]
                buf += chunk
                if len(buf) > caps[f]:
                    del buf[: len(buf) - caps[f]]
    try:
        proc.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), True
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), False


@SANDBOX_BACKENDS.register("local")
class LocalBackend(SandboxBackend):
    """bubblewrap on this machine (module docstring). `allow_weak_sandbox`: run without namespaces where
    they are unavailable instead of refusing (also `V32RL_ALLOW_WEAK_SANDBOX=1`)."""

    def __init__(self, allow_weak_sandbox: bool = False):
        self.allow_weak = allow_weak_sandbox or os.environ.get(_WEAK_ENV, "") not in ("", "0")

    @property
    def isolation(self) -> str:
        why = namespaces_available()
        if why is None:
            return "namespaces"
        if self.allow_weak:
            return "weak"
        raise SandboxUnavailable(
            f"sandbox: refusing to run model code without namespaces ({why}). Install bubblewrap "
            f"(`bash .ci/system-deps.sh` as root, or `apt-get install bubblewrap`), or accept the weaker mode "
            f"(rlimits and a process group only: no PID, mount or network isolation) with "
            f"allow_weak_sandbox=True or {_WEAK_ENV}=1.")

    def run(self, script: str, header: dict, payload: bytes, limits: SandboxLimits, wall_s: float) -> SandboxResult:
        isolation = self.isolation
        as_root = os.geteuid() == 0
        with contextlib.ExitStack() as stack:
            uids = stack.enter_context(_uid_block()) if as_root else None
            data = _header({**header, "pidns": isolation == "namespaces"}, limits, uids) + payload
            cg = _Cgroup(limits)
            stack.callback(cg.close)
            pass_fds: list[int] = []
            exe = _sandbox_python()[0]
            if isolation == "namespaces":
                program = _seccomp_program()
                seccomp_fd = None
                if program is not None:
                    seccomp_fd, w = os.pipe()
                    os.write(w, program)
                    os.close(w)
                    stack.callback(os.close, seccomp_fd)
                    pass_fds.append(seccomp_fd)
                argv, cwd = _bwrap_argv(limits, seccomp_fd, as_root), None
            else:
                cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="sandbox-"))
                if uids:
                    os.chown(cwd, uids[0], uids[0])
                argv = [exe]
            if exe == os.path.realpath(sys._base_executable):
                argv += [*_PY_FLAGS, _BOOT]
                data = _compiled(script) + data
            else:
                argv += [*_PY_FLAGS, script]
            if cg.procs:
                argv = ["/bin/sh", "-c", _JOIN, "sh", str(len(cg.procs)), *cg.procs, *argv]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            if cwd:
                env.update(HOME=cwd, TMPDIR=cwd)
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=env, pass_fds=pass_fds, start_new_session=True)
            try:
                out, err, timed_out = _communicate(proc, data, wall_s)
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                for f in (proc.stdin, proc.stdout, proc.stderr):
                    with contextlib.suppress(OSError):
                        f.close()
            rc = proc.returncode
            if isolation == "namespaces" and rc is not None and rc > 128:
                rc = 128 - rc  # bwrap reports a signal death as 128 + N
            if rc == 125 and cg.procs and b"cgroup" in err:
                raise SandboxUnavailable(f"sandbox: could not join the run's cgroup: {err.decode(errors='replace')[-300:]}")
            return SandboxResult(None if timed_out else rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                                 timed_out, time.monotonic() - t0, isolation)


@SANDBOX_BACKENDS.register("http")
@dataclass
class HttpBackend(SandboxBackend):
    """A SandboxFusion-compatible service: `POST {url}/run_code` with `{code, language: "python", stdin,
    run_timeout, memory_limit_MB}`; reads `run_result.{status, return_code, stdout, stderr}` (status
    `TimeLimitExceeded` is a time-out). Isolation is the service's: no per-run uids are sent, the harness's
    nonce and separate process still keep the verdict out of the solution's hands."""

    url: str = "http://127.0.0.1:8080"
    request_timeout_s: float = 60.0  # on top of the run's wall time
    headers: dict = field(default_factory=dict)
    isolation = "http"

    def run(self, script: str, header: dict, payload: bytes, limits: SandboxLimits, wall_s: float) -> SandboxResult:
        stdin = (_header({**header, "pidns": False}, limits, None) + payload).decode("utf-8", "replace")
        body = {"code": script, "language": "python", "stdin": stdin, "run_timeout": wall_s,
                "memory_limit_MB": 2 * limits.memory_mb}  # the harness's process and the program's
        req = urllib.request.Request(self.url.rstrip("/") + "/run_code", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **self.headers})
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=wall_s + self.request_timeout_s) as resp:
                reply = json.loads(resp.read())
        except (OSError, ValueError) as exc:
            raise SandboxUnavailable(f"sandbox service {self.url}: {exc}") from None
        run = reply.get("run_result") or {}
        timed_out = run.get("status") == "TimeLimitExceeded"
        if reply.get("status") == "SandboxError" and not timed_out:
            raise SandboxUnavailable(f"sandbox service {self.url}: {str(reply.get('message'))[:300]}")
        rc = run.get("return_code")
        return SandboxResult(None if timed_out or rc is None else int(rc), str(run.get("stdout") or "")[-(1 << 20):],
                             str(run.get("stderr") or "")[-(1 << 16):], timed_out, time.monotonic() - t0, "http")


# ---------------------------------------------------------------------------------------------------------
# What the scorers and the tool call.

def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "",
               backend: SandboxBackend | None = None) -> SandboxResult:
    """Run `code` as a script (`__main__`) in a fresh sandbox; never raises for anything the code does
    (`SandboxUnavailable` when the backend refuses to run)."""
    src = code.encode("utf-8", "replace")
    return (backend or get_backend()).run(harness_script(_h_script_main), {"code_len": len(src)},
                                          src + stdin.encode("utf-8", "replace"), limits, limits.timeout_s)


def run_harness(script: str, body: dict, limits: SandboxLimits, backend: SandboxBackend | None,
                wall_s: float) -> tuple[dict | None, SandboxResult]:
    """Run a harness script with `body` (and a fresh nonce) after the header; its report, or None when no
    well-formed report came back (an exit, a crash, the wall time-out)."""
    nonce = secrets.token_hex(16)
    res = (backend or get_backend()).run(script, {"timeout_s": limits.timeout_s},
                                         json.dumps({**body, "nonce": nonce}).encode(), limits, wall_s)
    last = res.stdout.rstrip("\n").rpartition("\n")[2]
    if res.timed_out or not last.startswith(nonce):
        return None, res
    try:
        report = json.loads(last[len(nonce):])
    except ValueError:
        return None, res
    return (report if isinstance(report, dict) else None), res


@dataclass(frozen=True)
class TestReport:
    passed: list[bool]  # one per test, in order; all False when no report came back
    errors: list[str]  # why each failed ("" when it passed)
    reported: bool  # False: no report (exit, crash or wall time-out of the sandbox)
    result: SandboxResult  # the raw run (its stderr tail helps debugging)

    @property
    def all_passed(self) -> bool:
        return self.reported and bool(self.passed) and all(self.passed)


def run_tests(solution: str, tests: list[str], limits: SandboxLimits = SandboxLimits(),
              backend: SandboxBackend | None = None) -> TestReport:
    """Run `tests` (Python sources, e.g. asserts) against `solution` with the trusted harness (module
    docstring, part 2). A test source that does not compile is a data error: raises SyntaxError."""
    for t in tests:
        compile(t, "<test>", "exec")
    report, res = run_harness(harness_script(_h_tests_main), {"solution": solution, "tests": list(tests)},
                              limits, backend, limits.timeout_s + 2.0)
    rows = report.get("tests") if report else None
    if not (isinstance(rows, list) and len(rows) == len(tests)
            and all(isinstance(r, list) and len(r) == 2 and type(r[0]) is bool for r in rows)):
        why = "timed out" if res.timed_out else f"no report from the harness (exit {res.returncode})"
        return TestReport([False] * len(tests), [why] * len(tests), False, res)
    return TestReport([r[0] for r in rows], [str(r[1]) for r in rows], True, res)
