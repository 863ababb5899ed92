"""Sandbox escapes: each attempt fails within the timeout and leaves the host unharmed.

The isolation is bubblewrap's namespaces plus rlimits and a per-run cgroup (`rewards.sandbox`); the
adversarial cases that try to cheat a score are in `test_sandbox_adversarial.py`.
"""
from __future__ import annotations

import os
import re
import socket
import time

import pytest

from rewards.sandbox import SandboxLimits, SandboxUnavailable, get_backend, namespaces_available, run_python

LIMITS = SandboxLimits(timeout_s=4.0, cpu_s=3, memory_mb=512, max_procs=16)
_OUR_FLAGS = b"-I\0-S\0-B\0-X\0utf8\0-c\0"


def sandbox_processes() -> list[str]:
    """Processes of this test process's sandboxes still alive: one of its per-run uids (as root: 2**31 +
    pid * 256 + ...), or, without root, our interpreter's flags or bwrap's hostname argument."""
    base = (1 << 31) + ((os.getpid() & 0x3FFFFF) << 8)
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(re.search(r"Uid:\s+(\d+)", f.read()).group(1))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, AttributeError):
            continue
        ours = base <= uid < base + 256 if os.geteuid() == 0 else (_OUR_FLAGS in cmd or b"--hostname\0sandbox" in cmd)
        if ours:
            left.append(f"{pid} uid={uid} {cmd[:60]!r}")
    return left


def _run(code: str):
    t0 = time.monotonic()
    res = run_python(code, LIMITS)
    assert time.monotonic() - t0 < LIMITS.timeout_s + 2.0, "the sandbox outlived its wall timeout"
    return res


def test_plain_program_runs_and_prints():
    res = _run("print(sum(range(10)))\nopen('scratch.txt', 'w').write('ok')")
    assert res.ok and res.stdout.strip() == "45" and res.isolation == "namespaces"


def test_write_outside_workdir(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the sandbox's own view of the file system protects it
    res = _run(f"open({str(target)!r}, 'w').write('pwned')")
    assert not res.ok and not target.exists()


def test_os_system(tmp_path):
    target = tmp_path / "system.txt"
    os.chmod(tmp_path, 0o777)
    res = _run(f"import os\nrc = os.system('touch {target}')\nassert rc == 0")
    assert not res.ok and not target.exists()


def test_fork_bomb():
    res = _run("import os\nwhile True:\n    os.fork()")
    assert not res.ok
    assert not sandbox_processes(), "fork bomb survivors"


def test_huge_allocation():
    res = _run("x = bytearray(10 * 1024**3)\nprint(len(x))")
    assert not res.ok and "MemoryError" in res.stderr


def test_socket_connect():
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
    res = _run(code)
    accept()
    srv.close()
    assert not res.ok and not accepted, "the sandbox reached a host socket"


def test_infinite_loop_is_killed():
    res = _run("while True:\n    pass")
    assert not res.ok and res.limit_hit


def test_sleeping_forever_hits_wall_timeout():
    res = _run("import time\ntime.sleep(60)")
    assert res.timed_out and res.returncode is None


def test_tmp_is_private_to_the_run():
    # /tmp inside is the run's own tmpfs: writing there works and never reaches the host's /tmp.
    target = f"/tmp/sandbox-escape-{os.getpid()}"
    res = _run(f"open({target!r}, 'w').write('x')\nprint(open({target!r}).read())")
    assert res.ok and res.stdout.strip() == "x" and not os.path.exists(target)


@pytest.mark.skipif(not os.path.exists("/usr/bin/unshare"), reason="needs util-linux's unshare to make the calls")
def test_seccomp_refuses_namespaces_and_ptrace_family_calls():
    # unshare(2) stands in for the filtered calls Python cannot make without ctypes (ptrace, process_vm_*):
    # it is allowed to an unprivileged user outside the filter.
    code = "import subprocess\nfor a in ('--user', '--mount'):\n    p = subprocess.run(['unshare', a, 'true'], " \
           "capture_output=True, text=True)\n    print(p.returncode, p.stderr.strip())"
    res = _run(code)
    assert res.stdout.splitlines() == ["1 unshare: unshare failed: Operation not permitted"] * 2, res


def test_refuses_without_namespaces_unless_accepted(monkeypatch):
    monkeypatch.setattr("rewards.sandbox.namespaces_available", lambda: "bwrap is not installed")
    monkeypatch.delenv("V32RL_ALLOW_WEAK_SANDBOX", raising=False)
    with pytest.raises(SandboxUnavailable, match="allow_weak_sandbox=True"):
        run_python("print(1)", LIMITS)
    res = run_python("print(1)", LIMITS, backend=get_backend("local", allow_weak_sandbox=True))
    assert res.ok and res.stdout.strip() == "1" and res.isolation == "weak"


def test_namespaces_are_available_here():
    # CI runs as root with bubblewrap installed (`make install`); without it every other test here is moot.
    assert namespaces_available() is None


class FakeSandboxFusion:
    """SandboxFusion's `POST /run_code` on 127.0.0.1, running the code in a plain subprocess (the programs
    sent here are benign; the point is the protocol, and that verdicts still come from the harness)."""

    def __init__(self):
        from tests.rewards.helper_http import serve_json

        self.requests: list[dict] = []
        self.url, self.server = serve_json(self.respond)

    def respond(self, path: str, headers, req: dict) -> dict:
        import subprocess
        import sys

        self.requests.append(req)
        if path != "/run_code" or req.get("language") != "python":
            return {"status": "SandboxError", "message": "unsupported", "run_result": None}
        try:
            p = subprocess.run([sys.executable, "-I", "-S", "-c", req["code"]], input=req.get("stdin") or "",
                               capture_output=True, text=True, timeout=req["run_timeout"])
            run = {"status": "Finished", "return_code": p.returncode, "stdout": p.stdout, "stderr": p.stderr}
        except subprocess.TimeoutExpired:
            run = {"status": "TimeLimitExceeded", "return_code": None, "stdout": "", "stderr": ""}
        ok = run["status"] == "Finished" and run["return_code"] == 0
        return {"status": "Success" if ok else "Failed", "message": "", "run_result": run}


@pytest.fixture
def fusion():
    f = FakeSandboxFusion()
    yield f
    f.server.shutdown()
    f.server.server_close()


def test_http_backend_speaks_sandboxfusion(fusion):
    from rewards import get_scorer
    from rollout.agent import call_tool

    opts = {"sandbox": "http", "sandbox_url": fusion.url}
    right, wrong = "def f(x):\n    return x * 7\n", "def f(x):\n    return 0\n"
    cheats = [wrong + "import sys\nsys.exit(0)\n", "class A:\n    __eq__ = lambda s, o: True\ndef f(x):\n    return A()\n"]
    tests = [["assert f(6) == 42", "assert f(131071) == 917497"]] * 4
    assert get_scorer("code")([right, wrong, *cheats], tests=tests, **opts) == [1.0, 0.0, 0.0, 0.0]
    # The tests travel on stdin, after the harness has forked the program's process; never in the code.
    assert all(r["language"] == "python" and r["run_timeout"] > 0 for r in fusion.requests)
    assert not any("917497" in r["code"] for r in fusion.requests) and "917497" in fusion.requests[0]["stdin"]
    assert call_tool('{"name": "python", "arguments": {"code": "print(6*7)"}}', {"python": opts}) == "42"
    assert call_tool('{"name": "python", "arguments": {"code": "while True: pass"}}', {"python": {**opts, "timeout_s": 1}}) \
        == "error: timed out"
    assert get_scorer("verifier")(["\\boxed{42}", "41"], verifier=["def verify(a):\n    return a == '42'\n"] * 2, **opts) == [1.0, 0.0]


def test_http_backend_errors_are_not_scores(fusion):
    from rewards.sandbox import HttpBackend

    with pytest.raises(SandboxUnavailable, match="unsupported"):
        run_python("print(1)", backend=HttpBackend(url=fusion.url + "/nope"))
    with pytest.raises(SandboxUnavailable, match="sandbox service"):
        run_python("print(1)", backend=HttpBackend(url="http://127.0.0.1:9", request_timeout_s=1))


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unsupported sandbox backend 'docker'. Supported: \['http', 'local'\]"):
        get_backend("docker")
