"""Run untrusted Python (model-written code) in a subprocess with two independent layers of containment.

OS layer (set in the child before it runs Python):
- its own session / process group, so the wall timeout kills the whole tree (fork bombs included);
- `resource` limits: CPU seconds, address space, file size, no core dumps, and a process-count limit;
- a fresh temp working directory, a minimal environment, `python -I` (no site, no user paths);
- when started as root (containers, CI): a new network namespace with no interfaces up (no network at
  all), and the process drops to the `nobody` user, so the file system outside its temp dir is read-only
  to it (except world-writable places such as /tmp, which the Python layer covers) and the
  process-count limit applies (root ignores RLIMIT_NPROC).
Python layer (`_GUARD`, an audit hook that cannot be removed once installed): refuses process creation,
sockets, `ctypes`, and writes outside the working directory, with a clear error in stderr.

What is not covered: a child that calls setsid() itself leaves the process group (the Python layer refuses
process creation; without it such a child lives until its CPU limit), CPU time of other tenants (no cgroups), timing side channels, and reading files that
are world-readable on the host (only writes are confined). Without root, network isolation rests on the
audit hook alone, which native code could bypass (ctypes is refused to make that harder).
"""
from __future__ import annotations

import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_CLONE_NEWNET = 0x40000000
_NOBODY = 65534

# Installed before the user's code. Audit hooks see every listed event, including from the stdlib.
_GUARD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_DENY = {"os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.kill", "os.killpg",
         "subprocess.Popen", "pty.spawn", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
         "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chdir", "os.setuid", "resource.setrlimit"}
_WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                 "os.chmod", "os.chown", "shutil.rmtree", "os.utime"}
def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else ".")
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)
def _hook(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and args and args[0] is not None and not isinstance(args[0], int):
        mode, flags = (args[1] or "r"), (args[2] or 0)
        writing = any(c in str(mode) for c in "wax+") or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
    if event in _WRITE_EVENTS and args and not _inside(args[0]):
        raise PermissionError(f"sandbox: {event} outside the working directory")
sys.addaudithook(_hook)
del _hook
'''

_RUNNER = r'''
import sys
with open("solution.py") as f:
    _src = f.read()
exec(compile(_GUARD_SRC, "<guard>", "exec"), {}) if _GUARD_ON else None
exec(compile(_src, "solution.py", "exec"), {"__name__": "__main__"})
'''


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock; the whole process group is killed after it
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    file_size_mb: int = 16  # RLIMIT_FSIZE (also caps captured stdout/stderr, which go to files)
    max_procs: int = 16  # RLIMIT_NPROC, effective for the dropped `nobody` user
    python_guard: bool = True  # the audit-hook layer; off only to test the OS layer alone


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed by the wall timeout
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    isolated_network: bool  # True when the child ran in its own empty network namespace

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def limit_hit(self) -> bool:
        """Stopped by a time limit: the wall timeout, or the CPU limit (SIGXCPU at the soft limit, SIGKILL at
        the hard one); under load the CPU limit can come first."""
        return self.timed_out or self.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


def _child_setup(limits: SandboxLimits, as_root: bool, workdir: str):
    def setup():  # runs in the child between fork and exec
        mb = 2**20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb, limits.file_size_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if as_root:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(_CLONE_NEWNET) != 0:
                os.write(2, b"sandbox: could not create a network namespace\n")
                os._exit(125)
            os.setgroups([])
            os.setgid(_NOBODY)
            os.setuid(_NOBODY)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_procs, limits.max_procs))

    return setup


def _world_executable(path: str) -> bool:
    """Can an unprivileged user run `path` (every directory on the way traversable, the file executable)?"""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return False
    parts = real.split(os.sep)
    dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and bool(os.stat(real).st_mode & 0o001)


@functools.lru_cache(maxsize=None)
def sandbox_python(as_root: bool) -> str:
    """The interpreter for the sandbox: ours, unless it lives where `nobody` cannot reach it (a venv under
    /root), then the system's. `SANDBOX_PYTHON` overrides. Sandboxed programs only get the stdlib."""
    if os.environ.get("SANDBOX_PYTHON"):
        return os.environ["SANDBOX_PYTHON"]
    candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    for c in candidates:
        if not as_root or _world_executable(c):
            return c
    raise RuntimeError(f"sandbox: no Python executable by the unprivileged user among {candidates}; set SANDBOX_PYTHON")


def run_python(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> SandboxResult:
    """Run `code` as a script in a fresh sandbox; never raises for anything the code does."""
    workdir = tempfile.mkdtemp(prefix="sandbox-")
    as_root = os.geteuid() == 0
    try:
        with open(os.path.join(workdir, "solution.py"), "w") as f:
            f.write(code)
        runner = f"_GUARD_SRC = {_GUARD!r}\n_GUARD_ON = {limits.python_guard!r}\n{_RUNNER}"
        if as_root:
            os.chown(workdir, _NOBODY, _NOBODY)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        t0 = time.monotonic()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sandbox_python(as_root), "-I", "-c", runner],
                cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                start_new_session=True, preexec_fn=_child_setup(limits, as_root, workdir),
            )
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        wall = time.monotonic() - t0
        return SandboxResult(
            returncode=None if timed_out else proc.returncode,
            stdout=_read_tail(out_path), stderr=_read_tail(err_path),
            timed_out=timed_out, wall_s=wall, isolated_network=as_root,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """SIGKILL the sandbox's whole process group (leftover children included)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_tail(path: str, limit: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
