"""A vLLM engine behind a plain class, run as a Ray actor with `ray.remote(VLLMEngine)` (see `engine_actor`).

Token ids in, `Sample` records out. The returned per-token log-probs are vLLM's `processed_logprobs`:
the log-probability of the sampled token under the distribution the sampler actually drew from (after
temperature, top-k and top-p), i.e. pi_old of the V3.2 ratio. vLLM's default (`raw_logprobs`) would be
the untempered, untruncated model distribution, which is the wrong denominator as soon as temperature != 1
or top-p < 1.

Not covered here (see the rollout issue): routed-expert and sampling-mask capture through vLLM need its
GPU (Triton) model runner; on CPU use the reference engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rollout.sample import Sample, Status

# Defaults that make vLLM usable on a small CPU machine; an explicit environment value wins.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else one of two cores idles and the model runs on one thread
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: 2 s start instead of 12-14 s, faster on 2 cores
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc with a function (weight reload)
}


@dataclass(frozen=True)
class EngineConfig:
    model: str  # path to a local HF checkpoint directory
    dtype: str = "float32"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    seed: int = 0
    enable_return_routed_experts: bool = False  # GPU only (vLLM's Triton runner)
    return_sampling_mask: bool = False  # GPU only, vLLM >= 0.28
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM as is


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1  # samples per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off (vLLM's -1)
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


def check_model_dir(path: str, key: str = "model") -> Path:
    """One clear line instead of a traceback from deep inside vLLM or transformers."""
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json"
        raise FileNotFoundError(f"{key}: model path '{path}' {what} (expected a local HF checkpoint directory)")
    return p


def _is_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


class VLLMEngine:
    """One vLLM `LLM` (offline API). Construct inside a Ray actor or directly in a process."""

    def __init__(self, cfg: EngineConfig):
        check_model_dir(cfg.model, "rollout.engine.model")
        if _is_cpu():
            for k, v in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        from vllm import LLM  # after the environment is set: vLLM reads it at import/engine start

        kwargs = dict(
            model=cfg.model,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            logprobs_mode="processed_logprobs",
            **cfg.extra,
        )
        if not _is_cpu():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.enable_return_routed_experts:
            kwargs["enable_return_routed_experts"] = True
        if cfg.return_sampling_mask:
            kwargs["return_sampling_mask"] = True
        self.cfg = cfg
        self.llm = LLM(**kwargs)
        self.policy_version = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, prompt_offset: int = 0) -> list[Sample]:
        """n samples for each prompt; sample j of prompt i has `prompt_index = prompt_offset + i`."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
        )
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                samples.append(self._to_sample(list(out.prompt_token_ids), c, prompt_offset + i))
        return samples

    def _to_sample(self, prompt_ids: list[int], c, prompt_index: int) -> Sample:
        ids = list(c.token_ids)
        logprobs = [lp[t].logprob for t, lp in zip(ids, c.logprobs)]
        s = Sample(
            prompt_ids=prompt_ids,
            response_ids=ids,
            logprobs=logprobs,
            loss_mask=[1] * len(ids),
            finish_reason=c.finish_reason,
            status=Status.TRUNCATED if c.finish_reason == "length" else Status.COMPLETED,
            policy_version=self.policy_version,
            prompt_index=prompt_index,
        )
        s.validate()
        return s

    def ping(self) -> int:
        return self.policy_version


def engine_actor(num_cpus: float = 1, num_gpus: float = 0):
    """The Ray actor class for `VLLMEngine` (import Ray only where actors are used)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(VLLMEngine)
