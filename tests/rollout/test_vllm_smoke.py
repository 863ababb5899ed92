"""vLLM inside a Ray actor: token ids in, token ids + per-token log-probs out, checked against transformers."""
from __future__ import annotations

import pytest
import torch

from rollout.sample import Status
from rollout.engine import EngineConfig, SamplingConfig
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
    samples = ray_cluster.get(vllm_moe_actor.generate.remote(prompts, sampling))
    assert len(samples) == 4
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    for s in samples:
        assert s.prompt_ids == prompts[s.prompt_index]
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
