"""Ray for the driver: start it in-process (loopback only) or attach to a running cluster.

A private instance's processes must not outlive the driver. Ray starts gcs_server, raylet and its monitors
with PR_SET_PDEATHSIG, and its workers exit when the raylet does, but the raylet's dashboard and runtime-env
agents do not: after a kill -9 of the driver they hang for about a minute in a call to the dead GCS. A
driver that is SIGKILLed cleans up nothing, so a watchdog process (`watch`, in its own session so that a
Ctrl-C or a kill of the driver's process group does not reach it) waits for the driver's exit and kills
every process of the Ray session: those naming its session dir or holding a file under it (Ray's daemons
name it on their command line, and every worker and agent, and what they fork, has its logs there open).
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager


def enable_token_auth_if_available() -> bool:
    """A client attaching to a cluster: Ray's token authentication on when a token is found (~/.ray/auth_token,
    RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and RAY_AUTH_MODE does not say otherwise, the rule of `ray start` and
    Ray's job-submission CLI (`ray.init` with an explicit address applies none: there the driver would have no
    token for a head that has one). Not forced on: Ray 2.60's `ray start --head` turns authentication on only
    when it finds a token, so on a machine without one the head has none, and a client in token mode failed
    before it connected. Without a token, Ray warns that the cluster is open. The found token is sent to
    `cluster.address`, whatever host that names."""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=True)


@contextmanager
def ray_session(cluster):
    """`cluster.address` None: a private in-process Ray bound to `cluster.host` (127.0.0.1 by default),
    no dashboard. 'auto' or host:port: attach to `ray start --head` or a cluster (`ray job submit`)."""
    if cluster.address is not None:
        enable_token_auth_if_available()
    import ray

    if ray.is_initialized():
        yield ray
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    on_sigterm, watchdog = signal.getsignal(signal.SIGTERM), None
    if cluster.address is None:
        # address="local": a new private instance even when `ray start` left a cluster on this machine (a bare
        # ray.init() would join it, with its own resources and lifetime).
        info = ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False, log_to_driver=False,
                        _node_ip_address=cluster.host, runtime_env=env)
        watchdog = subprocess.Popen([sys.executable, "-m", "rl.cluster", str(os.getpid()), info.address_info["session_dir"]],
                                    env={**os.environ, "PYTHONPATH": env["env_vars"]["PYTHONPATH"]},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    else:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # ray.init replaced the caller's handler (rl.train's stop) with its own
    try:
        yield ray
    finally:
        ray.shutdown()
        if watchdog is not None:  # the driver lives on: nothing to clean
            watchdog.kill()
            watchdog.wait()


def watch(driver: int, session_dir: str) -> int:
    """The watchdog's body: wait until `driver` exits, then SIGKILL every process of the Ray session in
    `session_dir` (a repeated sweep: one may be forking as it is killed). Returns how many were killed."""
    try:
        select.select([os.pidfd_open(driver)], [], [])  # readable once it has exited
    except ProcessLookupError:  # gone before we looked
        pass
    except OSError:  # no pidfd (Linux < 5.3): poll; a zombie has exited too
        while _state(driver) not in ("", "Z"):
            time.sleep(0.5)
    killed: set[int] = set()
    for _ in range(20):  # until a sweep finds none (about 5 s at most)
        found = [pid for pid in _processes() if pid not in killed and _in_session(pid, session_dir)]
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    if killed:
        print(f"rl.cluster watchdog: the driver (pid {driver}) exited without stopping Ray; killed {len(killed)} "
              f"processes of {session_dir}", file=sys.stderr)
    return len(killed)


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, Z, ...), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return ""


def _processes() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and int(name) != os.getpid()]


def _in_session(pid: int, session_dir: str) -> bool:
    """Does the process name `session_dir` on its command line or hold a file under it open? (A zombie does
    neither: it is dead already.)"""
    inside = session_dir.rstrip("/") + "/"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if any(inside.encode() in arg + b"/" for arg in f.read().split(b"\0")):  # the dir or a path under it
                return True
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or another user's
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside):
                return True
        except OSError:
            pass
    return False


def _sees(marker: str, token: str, node_id: str) -> bool:
    """Runs on one node: does it read the driver's marker, and can it write one back next to it?"""
    from pathlib import Path

    p = Path(marker)
    try:
        if p.read_text() != token:
            return False
        p.with_name(f"{p.name}-{node_id}").write_text(token)
        return True
    except OSError:
        return False


def check_shared_dir(path: str, key: str) -> None:
    """Fail unless every alive node of the cluster sees `path` as the driver does: the driver writes a marker
    there, a task pinned to each node reads it and writes one of its own, the driver reads those back. A
    node-local directory (or a relative path, which each node resolves against its own working directory)
    fails with a ConfigError naming `key`."""
    import secrets
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rl.config import ConfigError

    root = Path(path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    marker = root / f".shared-check-{token}"
    marker.write_text(token)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    probe = ray.remote(num_cpus=0)(_sees)
    try:
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(str(marker), token, n["NodeID"]) for n in nodes])
        back = [(root / f"{marker.name}-{n['NodeID']}").is_file() for n in nodes]
    finally:
        for f in root.glob(f"{marker.name}*"):
            f.unlink(missing_ok=True)
    bad = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, a, b in zip(nodes, seen, back) if not (a and b)]
    if bad:
        raise ConfigError(f"{key}: '{root}' is not storage every node sees (nodes {bad} do not see the driver's "
                          "files there); the run dir holds the model init, weight-sync checkpoints and checkpoints "
                          "that every node reads: put it on a file system mounted at the same path on every node")


if __name__ == "__main__":  # the watchdog: python -m rl.cluster DRIVER_PID SESSION_DIR
    watch(int(sys.argv[1]), sys.argv[2])
