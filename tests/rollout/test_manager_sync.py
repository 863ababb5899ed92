"""Two engine actors and a driver: groups for 16 prompts, a weight sync through each transport that runs on CPU,
regeneration with the new weights, and a synced engine behaving exactly like a fresh engine loaded from the
same weights. The tensor transports write no file."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from ray import cloudpickle

from rollout.engine import EngineConfig, GenerationStats, SamplingConfig, engine_actor
from rollout.manager import RolloutManager, StaleWeightsError
from rollout.reference_engine import load_hf_model
from rollout.sample import Status
from rollout.weight_transfer import SyncSpec, WeightSync, push, sync_state
from rollout.weights import export_hf_checkpoint

PROMPTS = [[(7 * i + j) % 1000 + 3 for j in range(4 + i % 5)] for i in range(16)]
# Longer than one KV block (128 tokens on vLLM CPU): their first block is prefix-cached before a sync, and a
# synced engine must not reuse it (KV of the old weights).
LONG = [[(5 * j + 11 * i) % 1000 + 3 for j in range(200 + i)] for i in range(2)]
GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=12)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "config.json")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _Holder runs in an actor; workers cannot import tests


def perturbed_checkpoint(src: str, out, seed: int = 1, scale: float = 0.05):
    model = load_hf_model(src, "float32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return str(export_hf_checkpoint(model, out, tokenizer_dir=src, bucket_mb=1))


class _Holder:
    """The learner's side of a sync in a process of its own (Ray actor): a HF model, pushed like
    `rl.learner.Learner.push_weights` pushes (`rollout.weight_transfer.push`)."""

    def __init__(self, path: str):
        self.path, self.model = path, load_hf_model(path, "float32")

    def push_weights(self, spec, engines, version):
        return push(sync_state(self.model), spec, engines, version)

    def export_hf(self, out_dir, bucket_mb=512, version=None):
        return str(export_hf_checkpoint(self.model, out_dir, self.path, bucket_mb))


class _Learner:
    """What `WeightSync` calls, in the driver (as `rl.learner.LearnerGroup` is)."""

    def __init__(self, ray, path: str):
        self.ray, self.actor = ray, ray.remote(num_cpus=0)(_Holder).remote(path)
        self.exports = 0

    def push_weights(self, spec, engines, version):
        return self.ray.get(self.actor.push_weights.remote(spec, engines, version))

    def export_hf(self, out_dir, bucket_mb=512, version=None):
        self.exports += 1
        return self.ray.get(self.actor.export_hf.remote(out_dir, bucket_mb, version))


def weight_files(*roots) -> set[str]:
    return {str(p) for root in roots for pat in WEIGHT_FILES for p in Path(root).rglob(pat)}


def sync(ray, mgr: RolloutManager, weights: str, transport: str, sync_dir, version: int) -> WeightSync:
    """Bring `mgr`'s engines to the checkpoint `weights` through `transport` (small buckets: several of them).
    Keep the result: the learner stand-in owns the object-store buckets that restarted engines reload."""
    spec = SyncSpec(transport, bucket_mb=1, dtype="float32")
    ws = WeightSync(_Learner(ray, weights), mgr, spec, str(sync_dir))
    ws.sync(version)
    return ws


def _greedy(actor_or_manager, ray):
    prompts = PROMPTS[:6] + LONG
    if isinstance(actor_or_manager, RolloutManager):
        return [g[0] for g in actor_or_manager.generate(prompts, GREEDY)]
    return [g[0] for g in ray.get(actor_or_manager.generate.remote(prompts, GREEDY))]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("kind,engine,transport", [
    ("tiny_dense", "vllm", "checkpoint"), ("tiny_dense", "vllm", "object_store"),
    ("tiny_moe", "vllm", "checkpoint"),  # vLLM MoE on CPU: the restart path only (rl.config refuses the rest)
    ("tiny_moe", "reference", "checkpoint"), ("tiny_moe", "reference", "object_store"),
])
def test_generate_sync_regenerate(ray_cluster, request, tmp_path, kind, engine, transport):
    model_dir = request.getfixturevalue(kind)
    cfg = EngineConfig(model=model_dir, engine=engine, max_model_len=256, seed=0)
    mgr = RolloutManager(cfg, num_engines=2, chunk_prompts=3)
    try:
        stats = GenerationStats()
        groups = mgr.generate(PROMPTS, SamplingConfig(n=4, max_tokens=8, seed=0), stats)
        assert [len(g) for g in groups] == [4] * 16 and stats.chunks == 6 and stats.aborted_samples == 0
        assert all(s.prompt_ids == p for p, g in zip(PROMPTS, groups) for s in g)
        samples = [s for g in groups for s in g]
        assert all(s.status in (Status.COMPLETED, Status.TRUNCATED) and s.policy_version == 0 for s in samples)
        before = _greedy(mgr, ray_cluster)

        new = perturbed_checkpoint(model_dir, tmp_path / "step1")
        files = weight_files(tmp_path)
        ws = sync(ray_cluster, mgr, new, transport, tmp_path / "weights_sync", version=1)
        # The checkpoint transport writes its export here (which shows that the check sees files); the tensor
        # transports write nothing and never ask the learner for an export.
        written = weight_files(tmp_path) - files
        assert bool(written) == (transport == "checkpoint") == bool(ws.learner.exports), written
        after = _greedy(mgr, ray_cluster)
        assert all(s.policy_version == 1 for s in after)
        assert [s.response_ids for s in after] != [s.response_ids for s in before], "generation did not change"

        fresh = engine_actor(num_cpus=1).remote(EngineConfig(model=new, engine=engine, max_model_len=256, seed=0))
        reference = _greedy(fresh, ray_cluster)
        ray_cluster.kill(fresh)
        assert [s.response_ids for s in after] == [s.response_ids for s in reference]
        diff = max(abs(a - b) for x, y in zip(after, reference) for a, b in zip(x.logprobs, y.logprobs))
        assert diff == 0.0 or diff < 1e-6, diff
        # Greedy log-probs are processed (temperature 0 -> one kept token -> 0.0); compare sampled ones too,
        # on both engines (each loaded every bucket).
        sp = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=5)
        fresh = engine_actor(num_cpus=1).remote(EngineConfig(model=new, engine=engine, max_model_len=256, seed=0))
        b = [s for g in ray_cluster.get(fresh.generate.remote(PROMPTS[:3], sp)) for s in g]
        ray_cluster.kill(fresh)
        for e in mgr.engines:
            a = [s for g in ray_cluster.get(e.generate.remote(PROMPTS[:3], sp)) for s in g]
            assert [s.response_ids for s in a] == [s.response_ids for s in b]
            assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) < 1e-6
    finally:
        mgr.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["checkpoint", "object_store"])
def test_dead_engine_is_restarted_synced_and_nothing_is_lost(ray_cluster, tiny_dense, tmp_path, transport):
    cfg = EngineConfig(model=tiny_dense, engine="reference", max_model_len=256, seed=0)
    mgr = RolloutManager(cfg, num_engines=2, chunk_prompts=4)
    try:
        new = perturbed_checkpoint(tiny_dense, tmp_path / "w")
        learner = sync(ray_cluster, mgr, new, transport, tmp_path / "weights_sync", version=3)  # noqa: F841  (alive)
        ray_cluster.kill(mgr.engines[1])  # dies before/while serving
        stats = GenerationStats()
        samples = [s for g in mgr.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0), stats) for s in g]
        assert len(samples) == 32 and stats.restarts >= 1 and stats.aborted_samples == 0
        assert all(s.policy_version == 3 for s in samples), "a restarted engine served stale weights"
        mgr.check_versions()
        fresh = engine_actor(num_cpus=1).remote(EngineConfig(model=new, engine="reference", max_model_len=256, seed=0))
        assert [s.response_ids for s in _greedy(mgr.engines[1], ray_cluster)] == \
            [s.response_ids for s in _greedy(fresh, ray_cluster)], "the restarted engine has other weights"
        ray_cluster.kill(fresh)
        mgr.version = 4  # the learner moved on without a sync
        with pytest.raises(StaleWeightsError, match=r"engines at the wrong policy version .*\(0, 3\), \(1, 3\)"):
            mgr.check_versions()
    finally:
        mgr.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["checkpoint", "object_store"])
def test_engine_dead_during_a_sync_is_restarted_with_the_new_weights(ray_cluster, tiny_dense, tmp_path, transport):
    """An engine that dies while the weights are pushed: the sync still ends with every engine at the new
    version (the dead one replaced and loaded like a later restart), and generation loses nothing."""
    cfg = EngineConfig(model=tiny_dense, engine="reference", max_model_len=256, seed=0)
    mgr = RolloutManager(cfg, num_engines=2)
    try:
        new = perturbed_checkpoint(tiny_dense, tmp_path / "w")
        dead = mgr.engines[1]
        ray_cluster.kill(dead)  # its update call fails inside the sync
        learner = sync(ray_cluster, mgr, new, transport, tmp_path / "weights_sync", version=2)  # noqa: F841  (alive)
        assert mgr.engines[1] is not dead
        mgr.check_versions()
        stats = GenerationStats()
        samples = [s for g in mgr.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0), stats) for s in g]
        assert len(samples) == 32 and stats.restarts == 0 and all(s.policy_version == 2 for s in samples)
        fresh = engine_actor(num_cpus=1).remote(EngineConfig(model=new, engine="reference", max_model_len=256, seed=0))
        assert [s.response_ids for s in _greedy(mgr.engines[1], ray_cluster)] == \
            [s.response_ids for s in _greedy(fresh, ray_cluster)], "the replaced engine has other weights"
        ray_cluster.kill(fresh)
    finally:
        mgr.shutdown()


def test_reference_engine_refuses_a_partial_or_foreign_sync(tiny_dense):
    from rollout.reference_engine import ReferenceEngine

    eng = ReferenceEngine(EngineConfig(model=tiny_dense, engine="reference"))
    named = list(sync_state(load_hf_model(tiny_dense, "float32")).items())
    with pytest.raises(ValueError, match="left 1 weights unloaded"):
        eng.update_weights_from_tensors(named[:-1], version=1)
    with pytest.raises(KeyError, match="no weight 'model.extra.weight'"):
        eng.update_weights_from_tensors([*named, ("model.extra.weight", torch.zeros(1))], version=1)
    assert eng.policy_version == 0
    eng.update_weights_from_tensors(named, version=1)
    assert eng.policy_version == 1
