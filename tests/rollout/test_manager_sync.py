"""Two engine actors and a driver: groups for 16 prompts, a weight sync, regeneration with the new weights,
and a synced engine behaving exactly like a fresh engine loaded from the same weights."""
from __future__ import annotations

import pytest
import torch

from rollout.engine import EngineConfig, SamplingConfig, engine_actor
from rollout.manager import RolloutManager, StaleWeightsError
from rollout.reference_engine import load_hf_model
from rollout.sample import Status
from rollout.weights import export_hf_checkpoint

PROMPTS = [[(7 * i + j) % 1000 + 3 for j in range(4 + i % 5)] for i in range(16)]
GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=12)


def perturbed_checkpoint(src: str, out, seed: int = 1, scale: float = 0.05):
    model = load_hf_model(src, "float32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return str(export_hf_checkpoint(model, out, tokenizer_dir=src, bucket_mb=1))


def _greedy(actor_or_manager, ray):
    if isinstance(actor_or_manager, RolloutManager):
        return actor_or_manager.generate(PROMPTS[:6], GREEDY)[0]
    return ray.get(actor_or_manager.generate.remote(PROMPTS[:6], GREEDY))


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("kind,engine", [("tiny_dense", "vllm"), ("tiny_moe", "vllm"), ("tiny_moe", "reference")])
def test_generate_sync_regenerate(ray_cluster, request, tmp_path, kind, engine):
    model_dir = request.getfixturevalue(kind)
    cfg = EngineConfig(model=model_dir, engine=engine, max_model_len=256, seed=0)
    mgr = RolloutManager(cfg, num_engines=2, chunk_prompts=3)
    try:
        samples, stats = mgr.generate(PROMPTS, SamplingConfig(n=4, max_tokens=8, seed=0))
        assert len(samples) == 64 and stats.chunks == 6 and stats.aborted_samples == 0
        assert sorted({s.prompt_index for s in samples}) == list(range(16))
        assert all(s.status in (Status.COMPLETED, Status.TRUNCATED) and s.policy_version == 0 for s in samples)
        before = _greedy(mgr, ray_cluster)

        new = perturbed_checkpoint(model_dir, tmp_path / "step1")
        mgr.update_weights(new, version=1)
        after = _greedy(mgr, ray_cluster)
        assert all(s.policy_version == 1 for s in after)
        assert [s.response_ids for s in after] != [s.response_ids for s in before], "generation did not change"

        fresh = engine_actor(num_cpus=1).remote(EngineConfig(model=new, engine=engine, max_model_len=256, seed=0))
        reference = _greedy(fresh, ray_cluster)
        ray_cluster.kill(fresh)
        assert [s.response_ids for s in after] == [s.response_ids for s in reference]
        diff = max(abs(a - b) for x, y in zip(after, reference) for a, b in zip(x.logprobs, y.logprobs))
        assert diff == 0.0 or diff < 1e-6, diff
        # Greedy log-probs are processed (temperature 0 -> one kept token -> 0.0); compare sampled ones too.
        sp = SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=5)
        fresh = engine_actor(num_cpus=1).remote(EngineConfig(model=new, engine=engine, max_model_len=256, seed=0))
        a = ray_cluster.get(mgr.engines[0].generate.remote(PROMPTS[:3], sp))
        b = ray_cluster.get(fresh.generate.remote(PROMPTS[:3], sp))
        ray_cluster.kill(fresh)
        assert [s.response_ids for s in a] == [s.response_ids for s in b]
        assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) < 1e-6
    finally:
        mgr.shutdown()


@pytest.mark.slow
def test_dead_engine_is_restarted_synced_and_nothing_is_lost(ray_cluster, tiny_dense, tmp_path):
    cfg = EngineConfig(model=tiny_dense, engine="reference", max_model_len=256, seed=0)
    mgr = RolloutManager(cfg, num_engines=2, chunk_prompts=4)
    try:
        mgr.update_weights(perturbed_checkpoint(tiny_dense, tmp_path / "w"), version=3)
        ray_cluster.kill(mgr.engines[1])  # dies before/while serving
        samples, stats = mgr.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0))
        assert len(samples) == 32 and stats.restarts >= 1 and stats.aborted_samples == 0
        assert all(s.policy_version == 3 for s in samples), "a restarted engine served stale weights"
        mgr.check_versions()
        mgr.version = 4  # the learner moved on without a sync
        with pytest.raises(StaleWeightsError, match=r"engines at the wrong policy version .*\(0, 3\), \(1, 3\)"):
            mgr.check_versions()
    finally:
        mgr.shutdown()
