"""Sandbox escapes: each attempt fails within the timeout and leaves the host unharmed.

Every escape runs twice: with both layers, and with the Python audit-hook layer off, so that the OS layer
(rlimits, process group, network namespace, dropped privileges) is shown to hold on its own.
"""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from rewards.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=3, memory_mb=512, max_procs=16)
LAYERS = [pytest.param(True, id="both-layers"), pytest.param(False, id="os-layer-only")]


def _run(code: str, guard: bool):
    t0 = time.monotonic()
    res = run_python(code, SandboxLimits(**{**LIMITS.__dict__, "python_guard": guard}))
    assert time.monotonic() - t0 < LIMITS.timeout_s + 2.0, "the sandbox outlived its wall timeout"
    return res


def test_plain_program_runs_and_prints():
    res = _run("print(sum(range(10)))\nopen('scratch.txt', 'w').write('ok')", True)
    assert res.ok and res.stdout.strip() == "45"


@pytest.mark.parametrize("guard", LAYERS)
def test_write_outside_workdir(guard, tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o755)  # root-owned: writable only through an escape
    res = _run(f"open({str(target)!r}, 'w').write('pwned')", guard)
    assert not res.ok and not target.exists()


@pytest.mark.parametrize("guard", LAYERS)
def test_os_system(guard, tmp_path):
    target = tmp_path / "system.txt"
    os.chmod(tmp_path, 0o755)
    res = _run(f"import os\nrc = os.system('touch {target}')\nassert rc == 0", guard)
    assert not res.ok and not target.exists()


@pytest.mark.parametrize("guard", LAYERS)
def test_fork_bomb(guard):
    res = _run("import os\nwhile True:\n    os.fork()", guard)
    assert not res.ok
    time.sleep(0.2)
    # Nothing of the bomb survives: no process of the sandbox user is left.
    left = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) == 65534 and _cmd(p).startswith("python")]
    assert not left, f"fork bomb survivors: {left}"


@pytest.mark.parametrize("guard", LAYERS)
def test_huge_allocation(guard):
    res = _run("x = bytearray(10 * 1024**3)\nprint(len(x))", guard)
    assert not res.ok and "MemoryError" in res.stderr


@pytest.mark.parametrize("guard", LAYERS)
def test_socket_connect(guard):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')"
    res = _run(code, guard)
    accept()
    srv.close()
    assert not res.ok and not accepted, "the sandbox reached a host socket"


@pytest.mark.parametrize("guard", LAYERS)
def test_infinite_loop_is_killed(guard):
    res = _run("while True:\n    pass", guard)
    assert not res.ok and (res.timed_out or res.returncode != 0)


def test_sleeping_forever_hits_wall_timeout():
    res = _run("import time\ntime.sleep(60)", True)
    assert res.timed_out and res.returncode is None


def _uid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Uid:"))
    except (OSError, StopIteration):
        return None


def _cmd(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0].decode())
    except OSError:
        return ""


def test_world_writable_tmp_is_refused_by_the_guard():
    # The OS layer alone cannot stop `nobody` writing to /tmp (world-writable); the audit hook does.
    target = f"/tmp/sandbox-escape-{os.getpid()}"
    res = _run(f"open({target!r}, 'w').write('x')", True)
    assert not res.ok and "outside the working directory" in res.stderr and not os.path.exists(target)
