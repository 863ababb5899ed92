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
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address=cluster.host, runtime_env=env)
    else:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
    try:
        yield ray
    finally:
        ray.shutdown()
