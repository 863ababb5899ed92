"""What every rollout engine shares: its config, the sampling config, the registry, and the Ray actor.

Everything that produces rollouts is a `Generator`: `generate(prompts, sampling, stats=None) -> Groups`, the
n samples of prompt i in `groups[i]` (engines, `rollout.manager.RolloutManager`, the agent runner bound to one
of them, the scripted policy). An engine is a Generator in this process with
`update_weights(path, version)` (a HF checkpoint), `update_weights_from_tensors(named, version)` (state-dict
names, streamed: `rollout.weight_transfer`) and `ping() -> version`; vLLM also loads over CUDA IPC and NCCL.
`vllm` is the default; `reference` (pure PyTorch, exact routing and sampling-mask capture on CPU) is selected
with `rollout.engine=reference`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rewards.registry import Registry
from rollout.sample import Sample

ENGINES: Registry = Registry("rollout engine")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # path to a local HF checkpoint directory
    engine: str = "vllm"  # a name in ENGINES
    dtype: str = "float32"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    seed: int = 0
    enable_return_routed_experts: bool = False  # vLLM: GPU only (Triton runner); reference: always on for MoE
    return_sampling_mask: bool = False  # vLLM: GPU only, >= 0.28; reference: on when sampling truncates
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM as is


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 1  # samples per prompt (the GRPO group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 64
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # generate max_tokens every time (benchmarks)


Groups = list[list[Sample]]  # groups[i]: the samples of prompts[i], sampling.n of them


@dataclass
class GenerationStats:
    """What happened while generating (filled by the generator that saw it; engines in this process leave it)."""

    chunks: int = 0
    retries: int = 0
    restarts: int = 0
    aborted_samples: int = 0
    errors: list[str] = field(default_factory=list)


class Generator(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 stats: GenerationStats | None = None) -> Groups:
        """`sampling.n` samples for each prompt, grouped by prompt in the prompts' order."""
        ...


def check_groups(groups: Groups, num_prompts: int, n: int) -> Groups:
    """The grouping guarantee: one group per prompt, n samples each (a bookkeeping bug fails loudly here)."""
    wrong = [(i, len(g)) for i, g in enumerate(groups) if len(g) != n]
    if len(groups) != num_prompts or wrong:
        raise AssertionError(f"{len(groups)} groups for {num_prompts} prompts; groups without exactly {n} samples "
                             f"(index, count): {wrong[:10]}")
    return groups


def check_model_dir(path: str, key: str = "model") -> Path:
    """One clear line instead of a traceback from deep inside vLLM or transformers."""
    p = Path(path)
    if not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "has no config.json"
        raise FileNotFoundError(f"{key}: model path '{path}' {what} (expected a local HF checkpoint directory)")
    return p


def read_model_config(path: str) -> dict:
    import json

    with open(Path(path) / "config.json") as f:
        return json.load(f)


def is_moe_checkpoint(path: str) -> bool:
    cfg = read_model_config(path)
    return bool(cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts"))


def vocab_size_of(path: str) -> int:
    return int(read_model_config(path)["vocab_size"])


def captures_needed(keep_routing: bool, keep_sampling_mask: bool, moe: bool, top_k: int, top_p: float) -> tuple[bool, bool]:
    """(routed experts, sampling masks) that the corrections need from the engine: routing for keep routing
    on a MoE model; kept sets for keep sampling mask when sampling truncates (top-k or top-p < 1)."""
    return keep_routing and moe, keep_sampling_mask and (top_k > 0 or top_p < 1.0)


def make_engine(cfg: EngineConfig):
    """Construct the configured engine in this process."""
    import rollout.reference_engine  # noqa: F401  (register)
    import rollout.vllm_engine  # noqa: F401

    return ENGINES.get(cfg.engine)(cfg)


class EngineHost:
    """What a Ray actor holds: one engine, built from its config (so the actor class is engine-agnostic)."""

    def __init__(self, cfg: EngineConfig):
        self.engine = make_engine(cfg)

    def generate(self, prompts, sampling) -> Groups:
        return self.engine.generate(prompts, sampling)

    def update_weights(self, path: str, version: int) -> int:
        self.engine.update_weights(path, version)
        return self.engine.policy_version

    # Tensor weight sync (rollout.weight_transfer): each returns the engine's policy version afterwards.
    def update_weights_from_refs(self, refs: list, version: int) -> int:
        """Object store: the learner's buckets, fetched one at a time while the engine loads them."""
        from rollout.weight_transfer import tensors_from_refs

        self.engine.update_weights_from_tensors(tensors_from_refs(refs), version)
        return self.engine.policy_version

    def update_weights_from_ipc(self, handles: list, version: int | None) -> int:
        self.engine.update_weights_from_ipc(handles, version)
        return self.engine.policy_version

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.engine.init_weight_group(host, port, rank, world_size)

    def update_weights_from_nccl(self, plan: list, version: int) -> int:
        self.engine.update_weights_from_nccl(plan, version)
        return self.engine.policy_version

    def placement(self) -> tuple[str, tuple[str, ...]]:
        from rollout.weight_transfer import placement

        return placement()

    def weight_sync_stats(self) -> dict:
        """How the tensor syncs loaded (vLLM: `rollout.weight_transfer.VllmLoader`'s choices); {} otherwise."""
        stats = getattr(self.engine, "weight_sync_stats", None)
        return stats() if stats else {}

    def ping(self) -> int:
        return self.engine.policy_version


def engine_actor(num_cpus: float = 1, num_gpus: float = 0, max_restarts: int = 0, resources: dict | None = None):
    """The Ray actor class for `EngineHost` (Ray is imported only where actors are used); `resources`: custom
    Ray resources each engine needs (pins engines to the nodes that offer them)."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      resources=dict(resources or {}))(EngineHost)
