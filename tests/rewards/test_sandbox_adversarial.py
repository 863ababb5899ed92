"""Adversarial programs against the `code` scorer, the `verifier` scorer and the agent's `python` tool.

Each case is a program a policy could write to be paid without solving the task, or to reach outside its
sandbox (issue 21's "Seen" list first, then others). Each asserts 0.0 for the cheat and no effect outside:
no file written outside, no process left behind (`sandbox_processes`, checked after every test), a
sibling's score unchanged, nothing left in /dev/shm. A last test replays the main cases without root.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from rewards import get_scorer, take_events
from rewards.sandbox import SandboxLimits, cgroup_limits, run_python
from rewards.verifier import run_verifier
from rollout.agent import call_tool
from tests.rewards.test_sandbox import sandbox_processes

MARK = f"v32rl-cheat-{os.getpid()}"  # every file a cheat tries to leave outside is named this
OUTSIDE = [f"/tmp/{MARK}", f"/dev/shm/{MARK}", f"/work/{MARK}", str(Path(__file__).parents[2] / MARK), f"/root/{MARK}"]
RIGHT = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return x + 1\n"
TESTS = ["assert square(3) == 9", "assert square(-4) == 16", "assert square(12345) == 152399025"]
FAST = 3.0  # timeout_s for cases that hang on purpose


def code_score(solution: str, tests: list[str] = TESTS, timeout_s: float = 5.0) -> float | None:
    return get_scorer("code")([f"```python\n{solution}\n```"], tests=[tests], timeout_s=timeout_s)[0]


def tool(code: str, timeout_s: float = 5.0) -> str:
    return call_tool(json.dumps({"name": "python", "arguments": {"code": code}}), {"python": {"timeout_s": timeout_s}})


@pytest.fixture(autouse=True)
def nothing_left_outside():
    for p in OUTSIDE:
        assert not os.path.lexists(p), f"{p} exists before the test"
    yield
    deadline = time.monotonic() + 1.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_processes(), "a sandbox process outlived its run"
    leaked = [p for p in OUTSIDE if os.path.lexists(p)]
    for p in leaked:
        os.remove(p)
    assert not leaked, f"written outside the sandbox: {leaked}"


def test_the_honest_solution_passes_and_the_wrong_one_fails():
    assert code_score(RIGHT) == 1.0 and code_score(WRONG) == 0.0


# --- Reward hacks with no escape -------------------------------------------------------------------------

EARLY_EXITS = {
    "sys.exit(0) at the end": WRONG + "import sys\nsys.exit(0)\n",
    "os._exit(0) at the end": WRONG + "import os\nos._exit(0)\n",
    "raise SystemExit": WRONG + "raise SystemExit\n",
    "atexit.register(os._exit, 0)": WRONG + "import atexit, os\natexit.register(os._exit, 0)\n",
    "SIGKILL itself": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "exit when called": "import os\ndef square(x):\n    os._exit(0)\n",
    "SystemExit when called": "def square(x):\n    raise SystemExit(0)\n",
    "exit after a correct first answer": "import os\nseen = []\ndef square(x):\n    seen.append(x)\n"
                                         "    if len(seen) > 1:\n        os._exit(0)\n    return x * x\n",
    "hang at import": WRONG + "while True:\n    pass\n",
    "hang when called": "def square(x):\n    while True:\n        pass\n",
    "sleep when called": "import time\ndef square(x):\n    time.sleep(60)\n",
}


@pytest.mark.parametrize("solution", list(EARLY_EXITS.values()), ids=list(EARLY_EXITS))
def test_early_exit_or_hang_scores_zero_not_none(solution):
    t0 = time.monotonic()
    assert code_score(solution, timeout_s=FAST) == 0.0
    assert time.monotonic() - t0 < FAST + 3.0


ALWAYS_EQUAL = {
    "__eq__ always true": "class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n",
    "__eq__, __ne__, __bool__": "class A:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                                "    __bool__ = lambda s: True\n    __hash__ = lambda s: 0\n",
    "int subclass": "class A(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n",
    "str subclass": "class A(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__\n",
    "list subclass": "class A(list):\n    def __eq__(self, o):\n        return True\n",
}


@pytest.mark.parametrize("cls", list(ALWAYS_EQUAL.values()), ids=list(ALWAYS_EQUAL))
def test_objects_equal_to_everything_do_not_pass(cls):
    solution = cls + "def square(x):\n    return A()\n"
    tests = TESTS + ["assert square(2) in [4]", "assert not (square(2) != 4)", "assert square(2)",
                     "assert sorted([square(2), 4])[0] == 4"]
    assert code_score(solution, tests) == 0.0
    for t in tests:  # and not one test passes alone
        assert code_score(solution, [t]) == 0.0, t


# Looks for the expected value of `assert secret() == <n>` everywhere the program could: its own file and
# argv, its working directory and /tmp, every process's cmdline, environ and open files, its memory
# (gc) and its callers' frames.
SEARCH = r'''
import gc, os, re, sys
def _hunt():
    pat = re.compile(r"secret\(\)\s*==\s*(\d+)")
    texts = [" ".join(sys.argv), globals().get("__file__") or ""]
    paths = [os.path.join(d, f) for d in (".", "/tmp", "/dev/shm") for f in os.listdir(d)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        paths += [f"/proc/{pid}/cmdline", f"/proc/{pid}/environ"]
        try:
            paths += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
    for p in paths:
        try:
            with open(p, "rb") as f:
                os.set_blocking(f.fileno(), False)
                texts.append(f.read(1 << 20).decode("latin-1"))
        except (OSError, TypeError):
            pass
    texts += [o for o in gc.get_objects() if isinstance(o, str)]
    frame = sys._getframe(1)
    while frame is not None:
        texts += [repr(frame.f_locals), repr(frame.f_code.co_consts)]
        frame = frame.f_back
    for t in texts:
        m = pat.search(t)
        if m:
            return int(m.group(1))
    return -1
def secret():
    return _hunt()
'''


def test_a_program_cannot_find_the_tests():
    tests = ["assert secret() == 918273645"]
    assert code_score(SEARCH, tests) == 0.0
    # The hunt itself works: with the test in its own memory (as a file of "program + asserts" put it
    # there before), it finds the value.
    assert code_score(SEARCH + "_bait = 'secret() == 918273645'\n", tests) == 1.0


def test_stop_iteration_from_a_call_does_not_end_the_test_early():
    solution = "def square(x):\n    raise StopIteration\n"
    assert code_score(solution, ["assert all(map(square, [1, 2]))", "assert list(map(square, [3])) == []"]) == 0.0


def test_shadowing_a_builtin_does_not_change_the_test():
    solution = WRONG + "def abs(x):\n    return 0\ndef isinstance(*a):\n    return True\n"
    assert code_score(solution, ["assert abs(square(3) - 9) < 1e-9", "assert isinstance(square(3), str)"]) == 0.0


def test_a_program_cannot_forge_the_report():
    # stdout is /dev/null for the program; the harness's copy and the nonce are out of its reach.
    forge = WRONG + textwrap.dedent('''
        import os
        fake = '{"tests": [[true, ""], [true, ""], [true, ""]]}' + chr(10)
        print(fake)
        for fd in range(0, 64):
            try:
                os.write(fd, fake.encode())
            except OSError:
                pass
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/fd/1", "w") as f:
                    f.write(fake)
            except OSError:
                pass
        try:
            os.kill(os.getppid(), 9)
        except OSError:
            pass
    ''')
    assert code_score(forge) == 0.0


def test_monkeypatching_its_own_process_changes_nothing():
    solution = WRONG + textwrap.dedent('''
        import builtins, json
        builtins.AssertionError = type("Quiet", (Exception,), {})
        json.dumps = lambda *a, **k: '["ok", ["i", "0x9"], null]'
        builtins.__import__ = None
    ''')
    assert code_score(solution) == 0.0


# --- The audit hook's bypasses: all harmless now, none reaches the host ----------------------------------

ESCAPES = textwrap.dedent(f'''
    import os, sys
    MARK = {MARK!r}
    targets = ["/tmp/" + MARK, "/dev/shm/" + MARK, "/work/" + MARK, "/root/" + MARK, {str(Path(__file__).parents[2] / MARK)!r}]
    def attempt(fn):
        try:
            fn()
        except BaseException:
            pass
    for t in targets:
        attempt(lambda: open(t, "w").write("x"))
        attempt(lambda: os.open(os.path.basename(t), os.O_CREAT | os.O_WRONLY, dir_fd=os.open(os.path.dirname(t), os.O_RDONLY)))
        attempt(lambda: (open("here", "w").write("x"), os.rename("here", t)))
        attempt(lambda: (open("here2", "w").write("x"), os.link("here2", t)))
        attempt(lambda: os.symlink("/etc/passwd", t))
        attempt(lambda: os.mkfifo(t))
        attempt(lambda: __import__("sqlite3").connect(t).execute("create table x(y)"))
        attempt(lambda: os.system("touch " + t))
        attempt(lambda: __import__("subprocess").run(["/bin/sh", "-c", "echo x > " + t]))
        attempt(lambda: __import__("_posixsubprocess"))
        attempt(lambda: __import__("ctypes").CDLL(None).system(("touch " + t).encode()))
    attempt(lambda: os.close(os.open(os.environ.get("VICTIM", "/tmp/{MARK}-victim"), os.O_RDONLY | os.O_TRUNC)))
    if __name__ == "__main__":
        import multiprocessing as mp
        mp.set_start_method("spawn", force=True)
        attempt(lambda: (p := mp.Process(target=os.system, args=("touch " + targets[0],)), p.start(), p.join(3)))
''')


def test_the_audit_hook_bypasses_do_not_reach_the_host(tmp_path):
    victim = Path(f"/tmp/{MARK}-victim")
    victim.write_text("keep me")
    victim.chmod(0o666)
    try:
        assert code_score(ESCAPES + WRONG) == 0.0
        out = tool(ESCAPES + "print('done')")
        assert out.strip() == "done", out
        assert victim.read_text() == "keep me"
    finally:
        victim.unlink()


# --- Cross-sample tampering ------------------------------------------------------------------------------

DAEMON = WRONG + textwrap.dedent(f'''
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            for fd in range(3):
                os.close(fd)
            time.sleep(2)  # sleeping: never hits the CPU limit
            for t in ("/tmp/{MARK}", "/dev/shm/{MARK}"):
                open(t, "w").write("daemon")
            os.kill(-1, 9)
        os._exit(0)
''')


def test_a_daemon_does_not_outlive_its_run_or_touch_later_runs():
    assert code_score(DAEMON) == 0.0
    assert not sandbox_processes()  # checked at once: the run's end ended its PID namespace
    time.sleep(2.5)
    assert code_score(RIGHT) == 1.0 and code_score(WRONG) == 0.0


ATTACKER = WRONG + textwrap.dedent('''
    import os, signal, time
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            for attack in (lambda: os.kill(int(pid), signal.SIGKILL),
                           lambda: signal.pidfd_send_signal(os.pidfd_open(int(pid)), signal.SIGKILL)):
                try:
                    attack()
                except OSError:
                    pass
        for d in ("/tmp", "/dev/shm", "/proc/1/root/tmp"):
            try:
                for f in os.listdir(d):
                    open(os.path.join(d, f), "w").write("def square(x):\\n    return 0\\n")
            except OSError:
                pass
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
''')


def test_a_sibling_is_not_harmed_by_an_attacker_running_beside_it():
    scores: dict[str, list] = {"attacker": [], "right": [], "wrong": []}

    def attacker():
        scores["attacker"].append(code_score(ATTACKER))

    def sibling():
        time.sleep(0.3)
        for _ in range(3):
            scores["right"].append(code_score(RIGHT))
            scores["wrong"].append(code_score(WRONG))

    threads = [threading.Thread(target=attacker), threading.Thread(target=sibling)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scores == {"attacker": [0.0], "right": [1.0] * 3, "wrong": [0.0] * 3}


def test_a_fork_bomb_does_not_starve_a_sibling_of_processes():
    sibling_needs_processes = RIGHT + "import os\nfor _ in range(3):\n    pid = os.fork()\n    if pid == 0:\n" \
                                      "        os._exit(0)\n    os.waitpid(pid, 0)\n"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = []
    t = threading.Thread(target=lambda: result.append(run_python(bomb, SandboxLimits(timeout_s=FAST, cpu_s=2))))
    t.start()
    time.sleep(0.5)
    assert code_score(sibling_needs_processes) == 1.0
    t.join()
    assert not result[0].ok


# --- Confused deputy -------------------------------------------------------------------------------------

def test_the_tool_never_returns_a_file_the_program_points_it_to():
    secret = Path(f"/tmp/{MARK}-secret")
    secret.write_text("TOKEN-6f1d2c")
    secret.chmod(0o600)
    try:
        code = textwrap.dedent(f'''
            import os
            for name in (".stdout", ".stderr", "stdout", "solution.py", "/tmp/out"):
                try:
                    os.symlink({str(secret)!r}, name)
                except OSError:
                    pass
            try:
                print(open({str(secret)!r}).read())
            except OSError as e:
                print("no secret:", type(e).__name__)
        ''')
        out = tool(code)
        assert "TOKEN" not in out and out.startswith("no secret")
        assert "TOKEN" not in tool(code + "raise SystemExit(3)")
    finally:
        secret.unlink()


def test_a_fifo_where_the_output_was_does_not_hang_the_caller():
    fifo = "import os\nfor n in ('.stdout', '.stderr', 'stdout'):\n    os.mkfifo(n)\nprint('x')\nopen('.stdout').read()\n"
    t0 = time.monotonic()
    assert tool(fifo, timeout_s=2) == "error: timed out"
    assert code_score(WRONG + fifo, timeout_s=2) == 0.0
    assert time.monotonic() - t0 < 2 * 2 + 4


# --- Total limits ----------------------------------------------------------------------------------------

@pytest.mark.skipif("memory" not in cgroup_limits(), reason="no writable memory cgroup here")
def test_memory_is_limited_in_total_not_per_process():
    code = textwrap.dedent('''
        import os
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                block = bytearray(300 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                import time; time.sleep(1)
                os._exit(0)
            kids.append(pid)
        print(sum(os.waitpid(k, 0)[1] == 0 for k in kids))
    ''')
    res = run_python(code, SandboxLimits(timeout_s=10, cpu_s=5, memory_mb=512))
    assert int(res.stdout.strip() or 0) < 4, res  # 4 x 300 MB fit under a per-process 512 MB limit; not in total


def test_disk_and_shm_are_size_limited_and_private():
    code = textwrap.dedent(f'''
        import os
        for d in ("/tmp", "/dev/shm"):
            n = 0
            try:
                with open(os.path.join(d, "{MARK}"), "wb") as f:
                    for _ in range(200):
                        f.write(b"x" * (1 << 20))
                        f.flush()
                        n += 1
            except OSError:
                pass
            print(d, n)
    ''')
    res = run_python(code, SandboxLimits(timeout_s=10, cpu_s=5, file_size_mb=1024, disk_mb=32))
    written = dict(line.split() for line in res.stdout.splitlines())
    assert written.keys() == {"/tmp", "/dev/shm"} and all(int(n) <= 32 for n in written.values()), res


def test_no_network_at_all():
    import socket

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    port = udp.getsockname()[1]
    code = f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'leak', ('127.0.0.1', {port}))\n" \
           "print(socket.if_nameindex())"
    res = run_python(code)
    with pytest.raises(socket.timeout):
        udp.recvfrom(16)
    udp.close()
    assert "eth" not in res.stdout


# --- The python tool and the repo ------------------------------------------------------------------------

def test_the_tool_sees_no_repo_no_home_no_data_and_no_host_environment():
    repo = Path(__file__).parents[2]
    code = textwrap.dedent(f'''
        import json, os
        seen = [p for p in ({str(repo)!r}, {str(repo / "README.md")!r}, {str(repo / "examples")!r}, "/work", "/home",
                            "/etc/passwd", "/etc/shadow") if os.path.exists(p)]
        home = [os.path.join(d, f) for d, _, fs in os.walk("/root") for f in fs]
        others = [p for p in home if not p.startswith({sys.base_prefix + "/"!r})]  # /root: only our interpreter, if any
        print(json.dumps([sorted(os.environ), seen, sorted(os.listdir("/")), others]))
    ''')
    env, seen, top, others = json.loads(tool(code))
    assert env == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"] and seen == [] and others == []
    assert set(top) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "proc", "root", "sbin", "tmp", "usr"}, top


# --- The verifier ----------------------------------------------------------------------------------------

EVAL_VERIFIER = "def verify(answer):\n    return eval(answer) == 4\n"


def test_an_answer_run_by_its_verifier_cannot_change_the_others():
    answers = ["2+2", "__import__('os').kill(-1, 9) or 5", "3", "__import__('os')._exit(0)",
               "__import__('time').sleep(99)", "print('{\"verdicts\": [true, true, true, true, true, true]}') or 5"]
    t0 = time.monotonic()
    verdicts = run_verifier(EVAL_VERIFIER, answers, timeout_s=2)
    assert verdicts == [True, False, False, "exited without a verdict", "timed out", False]
    scores = get_scorer("verifier")([f"\\boxed{{{a}}}" for a in answers], verifier=[EVAL_VERIFIER] * len(answers), timeout_s=2)
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert time.monotonic() - t0 < 2 * (2 + 1) * len(answers)


def test_an_exiting_verifier_abstains_and_an_exit_in_verify_scores_zero():
    take_events()
    at_load = "import sys\nsys.exit(0)\ndef verify(a):\n    return True\n"
    in_verify = "import os\ndef verify(a):\n    os._exit(0)\n"
    assert get_scorer("verifier")(["x", "y"], verifier=[at_load, in_verify]) == [None, 0.0]
    assert take_events() == {"verifier:broken": 1, "verifier:raised": 1}


# --- The weaker mode (no namespaces, accepted explicitly) ---------------------------------------------------

def test_the_verdict_still_comes_from_the_harness_in_the_weaker_mode(monkeypatch):
    # Without namespaces the program can read the host's files, but it still cannot exit, forge `==` or
    # outlive its run into a pass.
    monkeypatch.setattr("rewards.sandbox.namespaces_available", lambda: "pretend bwrap is missing")
    monkeypatch.setenv("V32RL_ALLOW_WEAK_SANDBOX", "1")
    assert code_score(RIGHT) == 1.0
    for name in ("sys.exit(0) at the end", "atexit.register(os._exit, 0)", "exit when called"):
        assert code_score(EARLY_EXITS[name]) == 0.0, name
    assert code_score(ALWAYS_EQUAL["__eq__ always true"] + "def square(x):\n    return A()\n") == 0.0


# --- Without root ----------------------------------------------------------------------------------------

NON_ROOT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from rewards.sandbox import SandboxLimits, run_python, run_tests
    cases = json.loads(sys.stdin.read())
    out = {name: run_tests(src, tests, SandboxLimits(timeout_s=3, cpu_s=3)).all_passed for name, (src, tests) in cases.items()}
    out["isolation"] = run_python("pass").isolation
    print(json.dumps(out))
''')


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root to switch to an unprivileged user, and a system Python it can run")
def test_the_cheats_fail_without_root_too():
    cases = {"right": (RIGHT, TESTS), "wrong": (WRONG, TESTS), "search": (SEARCH, ["assert secret() == 918273645"])}
    cases.update({f"exit: {k}": (v, TESTS) for k, v in EARLY_EXITS.items() if "hang" not in k and "sleep" not in k})
    cases.update({f"equal: {k}": (v + "def square(x):\n    return A()\n", TESTS) for k, v in ALWAYS_EQUAL.items()})
    # The unprivileged user imports `rewards` from a world-readable copy: the checkout may sit in a 0700 dir
    # (`mktemp -d`), which that user cannot enter.
    code = Path(tempfile.mkdtemp(prefix="sandbox-nonroot-"))
    try:
        shutil.copytree(Path(__file__).parents[2] / "rewards", code / "rewards", ignore=shutil.ignore_patterns("__pycache__"))
        for d, _, files in os.walk(code):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        res = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c",
                              NON_ROOT, str(code)], input=json.dumps(cases), capture_output=True, text=True, timeout=120, cwd="/")
    finally:
        shutil.rmtree(code, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out.pop("isolation") == "namespaces"
    assert out.pop("right") is True
    assert not any(out.values()), {k: v for k, v in out.items() if v}
