"""vLLM inside a Ray actor: token ids in, token ids + per-token log-probs out, checked against transformers."""
from __future__ import annotations

import pytest
import torch

from rollout.engine import EngineConfig, SamplingConfig
from rollout.sample import Status
from rollout.vllm_engine import VLLMEngine

# fp32 on both sides; the residual is kernel summation order (vLLM's CPU attention / fused MoE vs
# transformers' eager modules), measured at 4.8e-7 on this model (AVX-512 machine). 1e-4 nats leaves room
# for other CPUs' kernels while a wrong temperature, a shifted position or a wrong expert fails by orders.
LOGPROB_ATOL = 1e-4


def hf_token_logprobs(model_dir: str, prompt: list[int], response: list[int], temperature: float = 1.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.vllm
def test_vllm_actor_logprobs_match_transformers(ray_cluster, vllm_moe_actor, tiny_moe):
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=3)
    groups = ray_cluster.get(vllm_moe_actor.generate.remote(prompts, sampling))
    assert [len(g) for g in groups] == [2, 2]
    samples = [s for g in groups for s in g]
    for i, s in enumerate(samples):
        assert s.prompt_ids == prompts[i // 2]
        assert len(s.response_ids) == len(s.logprobs) > 0
        assert s.status in (Status.COMPLETED, Status.TRUNCATED)
        ref = hf_token_logprobs(tiny_moe, s.prompt_ids, s.response_ids)
        diff = (torch.tensor(s.logprobs) - ref).abs().max().item()
        print(f"max |vLLM - HF| log-prob = {diff:.2e}")
        assert diff < LOGPROB_ATOL, f"max |vLLM - HF| log-prob = {diff}"


def test_missing_model_path_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"rollout.engine.model: model path '.*nope' does not exist"):
        VLLMEngine(EngineConfig(model=str(missing)))


@pytest.mark.vllm
@pytest.mark.slow
def test_sampling_mask_from_processed_logprobs(ray_cluster, tiny_dense):
    """The vLLM < 0.28 path (also forced here on 0.32 CPU): kept sets recovered from the processed log-probs
    equal the support of our vLLM-matching processing of the transformers logits, token by token."""
    from rollout.engine import engine_actor
    from rollout.sampling import process_logits

    cfg = EngineConfig(model=tiny_dense, max_model_len=256, return_sampling_mask=True,
                       extra={"sampling_mask_source": "logprobs"})
    actor = engine_actor(num_cpus=1).remote(cfg)
    sp = SamplingConfig(n=2, temperature=0.9, top_p=0.8, top_k=50, max_tokens=6, seed=0)
    samples = [s for g in ray_cluster.get(actor.generate.remote([[5, 6, 7, 8], [50, 60]], sp)) for s in g]
    ray_cluster.kill(actor)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32).eval()
    checked = 0
    for s in samples:
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0, len(s.prompt_ids) - 1 : -1]
        support = torch.isfinite(process_logits(logits, 0.9, 50, 0.8))
        for t in range(len(s.response_ids)):
            kept = set(s.kept.row(t).tolist())
            assert kept == set(support[t].nonzero().squeeze(-1).tolist()) and s.response_ids[t] in kept
            checked += 1
    assert checked >= 12
