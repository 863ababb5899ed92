"""Two Ray nodes on this machine (`ray.cluster_utils.Cluster`, custom resources node_a / node_b) and the driver
attached to them (`cluster.address`): the learner pinned to node_a, the reference engine to node_b, two GRPO
steps through `rl.train.main`. The engine ends holding the learner's weights (it samples exactly like a fresh
engine loaded from them) and no weight file is written for the sync; a run dir that a node cannot see is
refused, naming `trainer.run_dir`.

The driver runs in a subprocess (as `python -m rl.train` does) whose `sync_weights`, `export_hf` and
`update_weights` are wrapped to record what happened; the records come back as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--config-name", "quickstart", "distill.enabled=false", "trainer.steps=2", "data.prompts_per_step=4",
       "rollout.n=4", "rollout.max_tokens=16", "eval.max_prompts=4", "eval.k=2", "trainer.micro_batch_size=16",
       "trainer.eval_every=0", "trainer.save_every=0", "logging.wandb=false", "logging.plots=false",
       "logging.progress=false", "rollout.engine_resources={node_b: 0.1}", "trainer.learner_resources={node_a: 0.1}"]

DRIVER = r'''
import json, sys
from dataclasses import replace
import ray
from rl import train
from rl.learner import LearnerGroup
from rollout.engine import SamplingConfig, engine_actor
from rollout.manager import RolloutManager

out, check_dir = sys.argv[1], sys.argv[2]
rec = {"exports": [], "checkpoint_loads": 0, "syncs": []}
export, load, sync = LearnerGroup.export_hf, RolloutManager.update_weights, train.sync_weights

def exported(self, out_dir, *a, **k):
    rec["exports"].append(out_dir)
    return export(self, out_dir, *a, **k)

def loaded(self, *a, **k):
    rec["checkpoint_loads"] += 1
    return load(self, *a, **k)

def nodes_of(*actors):
    return [ray.get(a.placement.remote())[0] for a in actors]

def synced(s, learner, engines, version):
    t = sync(s, learner, engines, version)
    rec["syncs"].append(version)
    if version == s.cfg.trainer.steps:  # the engines now hold the learner's final weights: compare
        fresh = engine_actor(num_cpus=1, resources={"node_b": 0.1}).remote(
            replace(engines.cfg, model=learner.export_hf(check_dir)))
        prompts = [[5 + i, 17, 33 + 2 * i, 9] for i in range(4)]
        runs = {}
        for name, sp in (("greedy", SamplingConfig(n=1, temperature=0.0, max_tokens=12)),
                         ("sampled", SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=3))):
            runs[name] = [[(x.response_ids, x.logprobs) for g in ray.get(a.generate.remote(prompts, sp)) for x in g]
                          for a in (engines.engines[0], fresh)]
        rec.update(runs=runs, engine_version=ray.get(engines.engines[0].ping.remote()),
                   transport=engines.weight_sync.transport, learner_node=ray.get(learner.actors[0].placement.remote())[0],
                   engine_nodes=nodes_of(*engines.engines, fresh),
                   node_of={k: n["NodeID"] for n in ray.nodes() for k in ("node_a", "node_b") if k in n["Resources"]})
        ray.kill(fresh)
    return t

LearnerGroup.export_hf, RolloutManager.update_weights, train.sync_weights = exported, loaded, synced
code = train.main(sys.argv[3:])
rec["code"] = code
json.dump(rec, open(out, "w"))
sys.exit(code)
'''

SHARDED = r'''
import json, sys
import ray
from rl.cluster import ray_session
from rl.config import ClusterConfig
from rl.learner import LearnerConfig, LearnerGroup
from rollout.engine import EngineConfig, SamplingConfig, engine_actor
from rollout.manager import RolloutManager
from rollout.weight_transfer import SyncSpec, WeightSync

address, learner_model, engine_model, check_dir, out = sys.argv[1:6]
with ray_session(ClusterConfig(address=address)):
    group = LearnerGroup(LearnerConfig(model=learner_model), world_size=2, num_cpus=0.5, placement="spread")
    mgr = RolloutManager(EngineConfig(model=engine_model, engine="reference", max_model_len=256), num_cpus=0.5,
                         resources={"node_b": 0.1})
    WeightSync(group, mgr, SyncSpec("object_store", bucket_mb=1), check_dir + "-unused").sync(1)
    fresh = engine_actor(num_cpus=0.5, resources={"node_b": 0.1}).remote(
        EngineConfig(model=group.export_hf(check_dir), engine="reference", max_model_len=256))
    prompts, sp = [[5 + i, 17, 33 + 2 * i, 9] for i in range(4)], SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=3)
    runs = [[(x.response_ids, x.logprobs) for g in ray.get(a.generate.remote(prompts, sp)) for x in g] for a in (mgr.engines[0], fresh)]
    ranks = [ray.get(a.placement.remote())[0] for a in group.actors]
    json.dump({"runs": runs, "rank_nodes": ranks, "version": mgr.version}, open(out, "w"))
    group.shutdown()
'''

UNSHARED = r'''
import sys
import ray
from rl import cluster
from rl.config import ConfigError

ray.init(address=sys.argv[1], log_to_driver=False)
hidden = next(n["NodeID"] for n in ray.nodes() if "node_b" in n["Resources"])
shown = next(n["NodeID"] for n in ray.nodes() if "node_a" in n["Resources"])
# Stands in for a node-local disk: node_b reads nothing the driver writes (pickled by value: defined here).
real = cluster._sees
cluster._sees = lambda marker, token, node_id: node_id != hidden and real(marker, token, node_id)
try:
    cluster.check_shared_dir(sys.argv[2], "trainer.run_dir")
except ConfigError as exc:
    print(str(exc))
    print(hidden[:8], shown[:8])
    sys.exit(0)
sys.exit(3)
'''


def _env() -> dict:
    # The test cluster runs without token authentication (ray_session turns it on when it finds a token).
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def two_nodes():
    """The two-node cluster, its files under a private RAY_TMPDIR: Ray writes the address of the last cluster
    started to $RAY_TMPDIR/ray/ray_current_cluster, and a plain `ray.init()` (other tests, other processes on
    this machine) would attach to this cluster if that were /tmp/ray."""
    import shutil

    from ray.cluster_utils import Cluster

    private = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths have a length limit
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", private)
        # Explicitly without token authentication (the clients in _env() say so too): whether a Ray started
        # earlier in this process (the test session's) left token mode on must not matter.
        env.setenv("RAY_AUTH_MODE", "disabled")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1},
                                                          "include_dashboard": False})
        c.add_node(num_cpus=2, resources={"node_b": 1})
        c.wait_for_nodes()
    c.private_tmp = private
    yield c
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", private)
        c.shutdown()
    shutil.rmtree(private, ignore_errors=True)


def _weight_files(*roots) -> set[str]:
    return {str(p) for r in roots if Path(r).is_dir() for pat in ("*.safetensors", "*.bin", "*.pt") for p in Path(r).rglob(pat)}


@pytest.mark.slow
def test_two_grpo_steps_learner_on_a_engine_on_b_tensor_sync(two_nodes, tmp_path):
    run, out, check = tmp_path / "run", tmp_path / "record.json", tmp_path / "check"
    before = _weight_files(two_nodes.private_tmp)  # the cluster's own dir: objects spilled to disk would be there
    res = subprocess.run([sys.executable, "-c", DRIVER, str(out), str(check), *RUN, f"trainer.run_dir={run}",
                          f"cluster.address={two_nodes.address}"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert "trainer.weight_sync=object_store" in res.stdout, res.stdout[-2000:]  # auto, engines on CPU
    assert (rec["transport"], rec["syncs"], rec["engine_version"]) == ("object_store", [1, 2], 2), rec

    # Placement: the learner on node_a, the engines (and the fresh one) on node_b.
    assert rec["learner_node"] == rec["node_of"]["node_a"], rec
    assert set(rec["engine_nodes"]) == {rec["node_of"]["node_b"]}, rec

    # The synced engine is the learner: same tokens and log-probs as a fresh engine loaded from its weights.
    for name, (synced, fresh) in rec["runs"].items():
        assert [t for t, _ in synced] == [t for t, _ in fresh], name
        assert max(abs(a - b) for (_, x), (_, y) in zip(synced, fresh) for a, b in zip(x, y)) < 1e-6, name

    # No weight file for the sync: the learner exported only the final model (and our check), no engine loaded a
    # checkpoint (the only two ways a sync writes or reads weight files), no weights_sync folder in the run dir,
    # and Ray spilled no object to disk. (/dev/shm and /tmp are shared with other processes on this machine.)
    assert rec["checkpoint_loads"] == 0, rec
    assert sorted(rec["exports"]) == sorted([str(check), str(run.resolve() / "final_model")]), rec["exports"]
    assert not (run / "weights_sync").exists()
    assert _weight_files(two_nodes.private_tmp) - before == set()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["train/mismatch_kl"]) for r in rows if "train/loss" in r]
    assert [k for k, _ in steps] == [1, 2] and all(kl < 1e-6 for _, kl in steps), steps  # engine == learner each step


@pytest.mark.slow
def test_sharded_learner_spread_over_both_nodes_streams_its_weights(two_nodes, tiny_moe, tmp_path):
    """World size 2 (FSDP2 over gloo) with trainer.placement=spread: one rank per node, the process group at rank
    0's node; the engine starts from other weights and ends equal to a fresh engine loaded from the learner's.
    Buckets of 1 MB: several gathers and sends, per tensor (fused experts included)."""
    from rollout.tiny_models import build_tiny_model

    other = build_tiny_model("moe", tmp_path / "other", seed=1)
    out = tmp_path / "record.json"
    res = subprocess.run([sys.executable, "-c", SHARDED, two_nodes.address, tiny_moe, str(other), str(tmp_path / "check"),
                          str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert len(set(rec["rank_nodes"])) == 2 and rec["version"] == 1
    synced, fresh = rec["runs"]
    assert [t for t, _ in synced] == [t for t, _ in fresh]
    assert max(abs(a - b) for (_, x), (_, y) in zip(synced, fresh) for a, b in zip(x, y)) < 1e-6


def test_a_run_dir_one_node_cannot_see_is_refused(two_nodes, tmp_path):
    res = subprocess.run([sys.executable, "-c", UNSHARED, two_nodes.address, str(tmp_path / "run")], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    message, nodes = res.stdout.strip().splitlines()[-2:]
    hidden, seeing = nodes.split()
    assert message.startswith(f"trainer.run_dir: '{tmp_path / 'run'}' is not storage every node sees")
    assert hidden in message and seeing not in message  # only node_b is named
    assert list((tmp_path / "run").iterdir()) == []  # the markers are cleaned up


@pytest.mark.slow
def test_engine_node_lost_exits_clearly_and_the_rerun_resumes(two_nodes, tmp_path):
    """node_b (the engine's node) is lost mid-run: the driver exits within 60 s naming what no node offers
    (Ray would keep a replacement pending forever); once the node is back, the same command resumes from the
    checkpoint and every step's prompts are the stream's, once each."""
    import time

    from rl.components import setup
    from rl.config import load_config
    from rl.data import PromptStream

    run, steps = tmp_path / "run", 4
    cmd = [sys.executable, "-m", "rl.train", *RUN, f"trainer.steps={steps}", "trainer.save_every=1",
           f"trainer.run_dir={run}", f"cluster.address={two_nodes.address}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_000002" / "COMPLETE").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    [node_b] = two_nodes.worker_nodes  # the head is node_a
    two_nodes.remove_node(node_b)
    lost = time.time()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with pytest.MonkeyPatch.context() as env:  # back for the rerun (and later tests), as the fixture made it
            env.setenv("RAY_TMPDIR", two_nodes.private_tmp)
            env.setenv("RAY_AUTH_MODE", "disabled")
            two_nodes.add_node(num_cpus=2, resources={"node_b": 1})
            two_nodes.wait_for_nodes()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert time.time() - lost < 60
    assert "no live node offers" in err and "'node_b': 0.1" in err, err[-2000:]

    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    consumed = [json.loads(line) for line in (run / "consumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in consumed] == list(range(1, steps + 1))
    cfg = load_config(RUN[2:] + [f"trainer.steps={steps}"], "quickstart")
    stream = PromptStream(setup(cfg).train_prompts, cfg.data.shuffle_seed)
    assert [r["prompts"] for r in consumed] == [[p.source for p in stream.next(4)] for _ in range(steps)]


def test_learner_placement_no_node_offers_fails_naming_it(ray_cluster, tiny_dense):
    from rl.learner import LearnerConfig, LearnerFailure, LearnerGroup

    with pytest.raises(LearnerFailure, match=r"placement group \(1 x \{'CPU': 1, 'node_z': 1\}, spread\) was not placed "
                                             r"in 2 s: no node offers these resources"):
        LearnerGroup(LearnerConfig(model=tiny_dense), resources={"node_z": 1}, placement="spread", placement_timeout_s=2)


# ------------------------------------------------------------------------- placement and weight-sync config
@pytest.mark.parametrize("overrides,message", [
    (["trainer.weight_sync=gloo"], r"^trainer.weight_sync: unsupported 'gloo'. Supported: \['auto', 'nccl', 'ipc', "
                                   r"'object_store', 'checkpoint'\]"),
    (["trainer.weight_sync=nccl"], r"^trainer.weight_sync: nccl loads into vLLM engines only \(rollout.engine='reference'\)"),
    (["rollout=vllm", "model=tiny_dense", "trainer.weight_sync=ipc"], r"^trainer.weight_sync: ipc needs the learner and "
                                                                       r"the engines on GPUs"),
    (["rollout=vllm", "algo.keep_routing=false", "trainer.weight_sync=object_store"],
     r"^trainer.weight_sync: vLLM on CPU reloads MoE weights only by restarting from a checkpoint"),
    (["trainer.placement=strict_pack"], r"^trainer.placement: must be 'pack' or 'spread', got 'strict_pack'"),
    (["rollout.engine_resources={node_b: -1}"], r"^rollout.engine_resources.node_b: must be a number >= 0, got -1"),
    (["trainer.sync_bucket_mb=0"], r"^trainer.sync_bucket_mb: must be >= 1, got 0"),
])
def test_placement_and_weight_sync_that_cannot_work_are_refused(overrides, message):
    from rl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(overrides, gpus=0)


A, B = ("node1", ("0",)), ("node1", ("1",))  # (Ray node, GPU ids): two GPUs of one node


@pytest.mark.parametrize("overrides,gpus,moe,places,expected", [
    ([], 0, True, None, "object_store"),  # the reference engine on CPU
    (["rollout=vllm", "model=tiny_dense"], 0, False, None, "object_store"),  # vLLM dense on CPU: in-place reload
    (["rollout=vllm", "algo.keep_routing=false"], 0, True, None, "checkpoint"),  # vLLM MoE on CPU: restart path
    ([], 2, True, (A, [B, B]), "nccl"),  # engines on their own GPUs
    ([], 1, True, (A, [A]), "ipc"),  # one GPU, shared
    ([], 2, True, (A, [A, B]), "checkpoint"),  # NCCL cannot reach the engine on the learner's GPU
    (["rollout.tensor_parallel_size=2", "rollout.engine_gpus=2"], 4, True, None, "checkpoint"),
    (["trainer.weight_sync=checkpoint"], 2, True, None, "checkpoint"),  # the user's word
])
def test_auto_weight_sync_follows_the_placement(overrides, gpus, moe, places, expected):
    from rl.components import choose_transport
    from rl.config import load_config

    cfg = load_config(overrides, gpus=gpus)
    assert choose_transport(cfg, moe, lambda: places)[0] == expected
