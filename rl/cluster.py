"""Ray for the driver: start it in-process (loopback only) or attach to a running cluster."""
from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def ray_session(cluster):
    """`cluster.address` None: a private in-process Ray bound to `cluster.host` (127.0.0.1 by default),
    no dashboard. 'auto' or host:port: attach to `ray start --head` or a cluster (`ray job submit`)."""
    if cluster.address is not None:
        # Ray 2.60 clusters use token authentication by default; a client attaching must say so too (the
        # token comes from ~/.ray/auth_token or RAY_AUTH_TOKEN), before Ray reads its config at import.
        # Set RAY_AUTH_MODE=disabled to opt out.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        yield ray
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}}
    if cluster.address is None:
        # address="local": a new private instance even when `ray start` left a cluster on this machine (a bare
        # ray.init() would join it, with its own resources and lifetime).
        ray.init(address="local", num_cpus=cluster.num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address=cluster.host, runtime_env=env)
    else:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
    try:
        yield ray
    finally:
        ray.shutdown()


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
