"""Session fixtures: tiny checkpoints built once, Ray started once, one vLLM engine actor per session."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> str:
    from rollout.tiny_models import build_tiny_model

    return str(build_tiny_model("moe", tmp_path_factory.mktemp("tiny_moe"), seed=0))


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory) -> str:
    from rollout.tiny_models import build_tiny_model

    return str(build_tiny_model("dense", tmp_path_factory.mktemp("tiny_dense"), seed=0))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Local, loopback-only, no dashboard: the test cluster is private to this process tree.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="tests",
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_leaked_placement_groups(request):
    """A test on the session's cluster must free what it reserved: a placement group left behind holds its
    CPUs for the rest of the session, and a later test then waits forever for an actor (as a killed
    learner group's did). The leak fails the test that made it and is removed."""
    yield
    if "ray_cluster" not in request.fixturenames:
        return
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    left = [pg_id for pg_id, pg in placement_group_table().items() if pg["state"] != "REMOVED"]
    for pg_id in left:
        remove_placement_group(PlacementGroup(ray_id(pg_id)))
    assert not left, f"placement groups left behind: {left}"


def ray_id(hex_id: str):
    from ray._raylet import PlacementGroupID

    return PlacementGroupID(bytes.fromhex(hex_id))


@pytest.fixture(scope="session")
def vllm_moe_actor(ray_cluster, tiny_moe):
    """The session's one vLLM engine (in a Ray actor) on the tiny MoE; ~10-25 s to start."""
    from rollout.engine import EngineConfig, engine_actor

    actor = engine_actor(num_cpus=1).remote(EngineConfig(model=tiny_moe, max_model_len=512, seed=0))
    ray_cluster.get(actor.ping.remote())
    yield actor
    ray_cluster.kill(actor)
