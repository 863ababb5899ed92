"""The `verifier` scorer: a per-row verifier program (synthesised agentic tasks, `rl.synthesize`).

A verifier is Python source that defines `verify(answer: str) -> bool`. All the completions that share a
verifier are checked in one sandbox (`rewards.sandbox`), each in a process of its own: the harness forks
a child per answer that loads the verifier, says so, then calls `verify` and sends the verdict over its
own pipe; the harness ends the child (as root: every process of the child's uid, one uid per answer) and
reports all verdicts, prefixed with the run's nonce, on a stdout nothing else can write to. So one
answer cannot change another's verdict. The answer passed in is the final answer: the last `\\boxed{}`
after `</think>`, else that whole text.

Whose fault is what: a verifier that does not load (a syntax error, no `verify`, an exception, an exit or
a hang while loading) is the data's fault: None (abstain, counted as `verifier:broken`). Anything after
it loaded is the answer's: `verify` raising, returning a non-bool, exiting or timing out on it, and a
missing report, all score 0.0. Not covered: a verifier that executes the answer (`eval`) lets the answer
choose its own verdict; it still cannot reach the others'.
"""
from __future__ import annotations

# The modules the shipped harness code below uses (the sandbox script imports the same).
import _signal
import builtins
import os
import select
import time

from rewards.base import record_event, register_scorer
from rewards.rule import final_answer
from rewards.sandbox import (
    SandboxBackend,
    SandboxLimits,
    _h_become,
    _h_boot,
    _h_close_fds,
    _h_dumps,
    _h_loads,
    _h_read_all,
    _h_report,
    _h_report_channel,
    _h_text,
    _h_write,
    backend_from_options,
    harness_script,
    run_harness,
)


def _verify_one(source, answer, uid, hdr):
    """Check one answer in a child process; a verdict (True/False or why it failed as a str), or
    {"broken": why} when the verifier itself does not load."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setpgid(0, 0)
            _h_close_fds({w})
            _h_become(uid, hdr["max_procs"])
            ns = {"__name__": "verifier", "__builtins__": builtins}
            try:
                exec(compile(source, "verifier.py", "exec"), ns)
                if not callable(ns.get("verify")):
                    raise NameError("the verifier defines no verify(answer) function")
            except BaseException as exc:  # noqa: BLE001  anything while loading is the verifier's fault
                _h_write(w, (_h_dumps(["broken", _h_text(exc)]) + "\n").encode())
                os._exit(0)
            _h_write(w, b'["loaded"]\n')
            try:
                v = ns["verify"](answer)
                verdict = v if type(v) is bool else "not a bool: " + type(v).__name__
            except Exception as exc:  # noqa: BLE001
                verdict = _h_text(exc)
            _h_write(w, (_h_dumps(["done", verdict]) + "\n").encode())
        finally:
            os._exit(0)
    os.close(w)
    deadline, buf, timed_out = time.monotonic() + hdr["timeout_s"], b"", False
    while buf.count(b"\n") < 2:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            timed_out = True
            break
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    if uid is not None:  # as root: a fork that becomes the uid ends every process of it, however started
        k = os.fork()
        if k == 0:
            try:
                os.setuid(uid)
                os.kill(-1, _signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(k, 0)
    elif hdr["pidns"]:  # one uid for all, in our own PID namespace: everything but us and its init
        os.kill(-1, _signal.SIGKILL)
    else:
        try:
            os.killpg(pid, _signal.SIGKILL)
        except OSError:
            pass
    status = os.waitpid(pid, 0)[1]
    # The CPU limit (cpu_s ~ timeout_s) and the wall deadline race on a spinning verify: SIGXCPU/SIGKILL from
    # RLIMIT_CPU is the same timeout, not "exited".
    timed_out = timed_out or (os.WIFSIGNALED(status) and os.WTERMSIG(status) in (_signal.SIGXCPU, _signal.SIGKILL))
    msgs = []
    for line in buf.split(b"\n")[:2]:
        try:
            msgs.append(_h_loads(line))
        except ValueError:
            break
    if not msgs or msgs[0] != ["loaded"]:
        why = msgs[0][1] if msgs and msgs[0][0] == "broken" and len(msgs[0]) == 2 else "did not load (timed out or crashed)"
        return {"broken": str(why)}
    if len(msgs) == 2 and msgs[1][0] == "done" and len(msgs[1]) == 2 and type(msgs[1][1]) in (bool, str):
        return msgs[1][1]
    return "timed out" if timed_out else "exited without a verdict"


def _verifier_main():
    hdr = _h_boot()
    out = _h_report_channel()
    body = _h_loads(_h_read_all(0))
    uids, verdicts = hdr["uids"], []
    for i, answer in enumerate(body["answers"]):
        uid = uids[2 + i % (len(uids) - 2)] if uids else None
        v = _verify_one(body["source"], answer, uid, hdr)
        if type(v) is dict:
            _h_report(out, body["nonce"], v)
            os._exit(0)
        verdicts.append(v)
    _h_report(out, body["nonce"], {"verdicts": verdicts})
    os._exit(0)


def run_verifier(source: str, answers: list[str], timeout_s: float = 5.0,
                 backend: SandboxBackend | None = None) -> list[bool | str] | str:
    """Per answer: True/False, or why it scored nothing (verify raised, returned a non-bool, exited or timed
    out on it, or no report came back); or one text for the whole verifier when it does not load.
    `timeout_s` is per answer."""
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, int(timeout_s)))
    script = harness_script(_verifier_main, (_verify_one,))
    report, res = run_harness(script, {"source": source, "answers": list(answers)}, limits, backend,
                              wall_s=(timeout_s + 1.0) * len(answers) + 2.0)
    if report is not None and isinstance(report.get("broken"), str):
        return report["broken"][:300]
    verdicts = report.get("verdicts") if report else None
    if not (isinstance(verdicts, list) and len(verdicts) == len(answers) and all(type(v) in (bool, str) for v in verdicts)):
        return [f"no report from the sandbox (exit {res.returncode}{', timed out' if res.timed_out else ''})"] * len(answers)
    return verdicts


@register_scorer("verifier")
def verifier_scorer(completions: list[str], verifier: list, timeout_s: float = 5.0, sandbox: str = "local",
                    sandbox_url: str | None = None, allow_weak_sandbox: bool = False, **_) -> list[float | None]:
    """1.0 if the row's verifier accepts the final answer, 0.0 if it rejects it, raises, exits or times out
    on it; None (abstain, counted as `verifier:broken`) when the verifier itself does not load: a data
    error, not the completion's fault. Sandbox options as for the `code` scorer."""
    backend = backend_from_options(sandbox, sandbox_url, allow_weak_sandbox)
    out: list[float | None] = [None] * len(completions)
    by_source: dict[str, list[int]] = {}
    for i, src in enumerate(verifier):
        by_source.setdefault(str(src), []).append(i)
    for src, idx in by_source.items():
        verdicts = run_verifier(src, [final_answer(completions[i]) for i in idx], timeout_s, backend)
        if isinstance(verdicts, str):
            record_event("verifier", "broken", len(idx))
            continue
        for i, v in zip(idx, verdicts):
            if v is not True and v is not False:
                record_event("verifier", "raised")
            out[i] = 1.0 if v is True else 0.0
    return out
