"""GPU: vLLM's routed-expert capture and (derived) sampling masks vs our learner's replay and renormalisation.

On a Qwen3-MoE-style random model of realistic shape (~0.9B total parameters, 32 experts, top-4), bf16:
1. vLLM generates with `enable_return_routed_experts` and `logprobs_mode=processed_logprobs`;
2. our Learner (FSDP2 over NCCL, world size 1, bf16 mixed precision) recomputes the log-probs
   - without replay: train/infer routing agreement and log-prob mismatch KL;
   - with replay: the experts the learner's MoE blocks used vs vLLM's (must be 100%), mismatch KL;
3. with top-p 0.95 (V3.2's default) the kept sets come from vLLM: natively on vLLM >= 0.28
   (`return_sampling_mask`), else derived from the processed log-probs of the whole vocabulary; the step-0
   ratio with the mask renormalisation should be 1, without it biased (pi_theta over the full vocabulary).

    python bench/gpu_capture.py [--prompts 16] [--n 2] [--max-tokens 48] [--out DIR]
Not run inside a Ray actor here (Ray is not carried to the GPU machine); the engine class is the same one
the actor holds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    import numpy as np
    import torch
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qm

    from rl.learner import Learner, LearnerConfig, metric_means, plan_step
    from rollout.engine import EngineConfig, SamplingConfig
    from rollout.tiny_models import build_tiny_model
    from rollout.vllm_engine import VLLMEngine

    t0 = time.time()
    shape = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                 moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4, intermediate_size=2048)
    model_dir = str(build_tiny_model("moe", tempfile.mkdtemp(prefix="gpu-moe-"), seed=0, **shape))
    n_params = sum(math.prod(t.shape) for t in __import__("safetensors.torch").torch.load_file(
        os.path.join(model_dir, "model.safetensors")).values())
    prompts = [[(13 * i + j) % 1000 + 5 for j in range(16 + i % 16)] for i in range(a.prompts)]
    sp = SamplingConfig(n=a.n, temperature=1.0, top_p=0.95, max_tokens=a.max_tokens, seed=0)
    eng = VLLMEngine(EngineConfig(model=model_dir, dtype="bfloat16", max_model_len=512, enforce_eager=True,
                                  gpu_memory_utilization=0.3, enable_return_routed_experts=True, return_sampling_mask=True))
    t1 = time.time()
    samples = [s for g in eng.generate(prompts, sp) for s in g]
    t_gen = time.time() - t1
    mask_source = eng.mask_source
    del eng
    torch.cuda.empty_cache()
    import vllm

    res = {"vllm": vllm.__version__, "gpu": torch.cuda.get_device_name(), "params": n_params, "samples": len(samples),
           "gen_s": t_gen, "mask_source": mask_source,
           "routed_shape": list(samples[0].routed_experts.shape)}
    kept_sizes = [float(s.kept.sizes().mean()) for s in samples]
    res["kept_set_mean_size"] = float(np.mean(kept_sizes))

    used = []
    orig = qm.Qwen3MoeExperts.forward
    qm.Qwen3MoeExperts.forward = lambda self, h, idx, w: (used.append(idx.detach().cpu()), orig(self, h, idx, w))[1]

    def measure(keep_routing: bool, keep_mask: bool) -> dict:
        learner = Learner(LearnerConfig(model=model_dir, param_dtype="bfloat16", keep_routing=keep_routing,
                                        keep_sampling_mask=keep_mask, micro_batch_size=8))
        used.clear()
        lp = learner.logprobs(samples)
        if keep_routing:  # the experts the MoE blocks used == vLLM's, at every position and layer
            from rl.batch import collate

            routed = collate(samples).routed_experts  # [B, T, layers, k]
            B, T, L, k = routed.shape
            same = [torch.equal(used[l].reshape(B, T, k).sort(-1).values, routed[:, :, l].sort(-1).values) for l in range(L)]
            res["replay_experts_equal_vllm_all_layers"] = all(same)
        sums = learner.accumulate_grads(samples, plan_step(samples, 1, len(samples)))
        learner.zero_grads()
        d = np.concatenate([np.asarray(l) - np.asarray(s.logprobs) for s, l in zip(samples, lp)])
        out = {"mismatch_kl_k3": float(np.mean(np.exp(d) - d - 1)), "mean_log_ratio": float(d.mean()),
               "ratio_mean": float(np.mean(np.exp(d))), "routing_agreement": metric_means(sums)["routing_agreement"]}
        learner.shutdown()
        return out

    res["no_replay_with_mask"] = measure(False, True)
    res["replay_with_mask"] = measure(True, True)
    res["replay_no_mask"] = measure(True, False)
    qm.Qwen3MoeExperts.forward = orig
    res["total_s"] = time.time() - t0
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "gpu_capture.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
