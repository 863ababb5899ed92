"""The learner: a HF causal LM sharded with FSDP2 over torch.distributed (gloo on CPU, NCCL on GPU).
A single fp32 rank skips the sharding (nothing to shard; FSDP2 would only copy parameters back and forth);
several ranks, or bf16 mixed precision, use FSDP2. On one bf16 rank three FSDP2 steps that there only cast or copy
tensor by tensor are replaced by foreach ops and an in-place reduction (`_unshard_with_one_cast_at_one_rank`,
`_flat_grad_copy_in_at_one_rank`, `_reduce_in_place_at_one_rank`: they patch FSDP2 internals, checked against
torch 2.11 and 2.13, and are tested bit-equal to FSDP2's own path).

One `Learner` per rank; `LearnerGroup` runs them as Ray actors. A step gets the whole step's samples,
each rank trains on its slice in micro-batches, and the loss of every micro-batch is normalised by the
*step's* totals (sequences, tokens), so gradients do not depend on the micro-batch split or the number of
ranks. FSDP2 averages gradients over ranks; the loss is multiplied by the world size to undo that.

V3.2's corrections on the learner side:
- log-probs from hidden states in chunks (`rl.algos.token_logprobs`), never `[B, L, V]` logits;
- keep routing: the engine's expert ids are replayed in every MoE router (`rollout.routing`);
- keep sampling mask: pi_theta renormalised over the engine's kept sets, at the engine's temperature;
- the GRPO loss with unbiased KL and off-policy sequence masking (`rl.algos.grpo_loss`), beta per domain.

Not covered: tensor/pipeline/expert parallelism, sequence packing, CPU offload of optimizer states.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import shutil
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rl import algos
from rl.batch import TrainBatch, collate, split, to_device
from rl.dsa import DSA_LOSSES, layer_states
from rollout.dsa import attention_modules, keep_for_loss, maybe_install_dsa
from rollout.routing import RoutingController
from rollout.sample import Sample
from rollout.weights import recover_dir, replace_dir


@dataclass(frozen=True)
class LearnerConfig:
    model: str  # local HF checkpoint directory
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    logprob_chunk: int = 1024  # positions per log-prob chunk: ~1.2-1.6 GB of temporaries at a 152k vocabulary
    param_dtype: str = "float32"  # bfloat16: FSDP2 mixed precision (master weights and reductions stay fp32)
    # FSDP2's units, where FSDP2 is used (several ranks, or bf16): "layer" (each decoder layer, then the rest: one
    # layer's full weights and gradients at a time) or "model" (one unit: one gather and one reduction a
    # micro-batch instead of one per layer, with their hooks; the whole model's bf16 weights and gradients are
    # unsharded on every rank through the micro-batch, and its fp32 reduction buffer at the end: several bytes a
    # parameter more, not divided by the ranks).
    fsdp_wrap: str = "layer"
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (activation memory)
    # torch.compile with dynamic shapes: fuses the norms, rotary and activation (and their casts) into few kernels.
    # Each decoder layer is a region (one graph shared by the layers: parameters are its inputs). Not the whole
    # stack: tracing 24 layers with symbolic shapes under bf16 FSDP2 did not end in 7 minutes on an H200 (sympy
    # min/max simplification that grows with depth; bench/README.md), and MoE routers and DSA run eagerly. The
    # first step pays the compilation (training and no-grad forwards compile apart; a micro-batch of one sequence
    # specialises once more). The log-prob head's softmax passes compile too (rl.logprobs).
    compile: bool = False
    # Under `compile`: the share of each compiled layer's activations that backward may keep (torch._functorch's
    # activation_memory_budget, torchtitan's "memory_budget" mode). Below 1 the partitioner recomputes the cheapest
    # ops (norms, activations, casts) inside the compiled backward instead of saving their outputs: no extra host
    # calls, unlike gradient_checkpointing, which re-runs each layer's forward eagerly. 1.0 saves what it needs.
    activation_memory_budget: float = 1.0
    loss: str = "grpo"  # a POLICY_LOSSES name: grpo | sft
    loss_cfg: algos.LossConfig = algos.LossConfig()
    keep_routing: bool = True  # replay the engine's experts (MoE)
    keep_sampling_mask: bool = True  # renormalise pi_theta over the engine's kept sets
    # What the config promises the engine captured: a sample of an engine-sampled loss without it is an error.
    require_routing: bool = False
    require_sampling_mask: bool = False
    temperature: float = 1.0  # the engine's sampling temperature (pi_old is of logits / temperature)
    kl_coefs: dict = field(default_factory=dict)  # domain -> beta; no reference model when all are 0
    seed: int = 0
    collective_timeout_s: float = 300.0  # a rank stuck this long in a collective fails instead of hanging
    dsa_loss: str | None = None  # DSA models: an rl.dsa.DSA_LOSSES name added to every step ("sparse")
    dsa_loss_coef: float = 1.0


class Learner:
    def __init__(self, cfg: LearnerConfig, rank: int = 0, world_size: int = 1, master_port: int | None = None,
                 master_addr: str | None = None):
        from rollout.weight_transfer import free_port

        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":  # Ray shows each rank its own GPU as 0; object collectives use the current one
            torch.cuda.set_device(self.device)
        self._sync_cache: dict = {}  # a weight-sync transport's state between syncs (the NCCL group)
        if not dist.is_initialized():
            os.environ["MASTER_ADDR"] = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(master_port or free_port("127.0.0.1"))
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=cfg.collective_timeout_s))
        self._seed(cfg.seed)
        self.model, self.routing = self._load(trainable=True)
        self.ref = None
        if any(float(b) != 0.0 for b in cfg.kl_coefs.values()):
            self.ref, self.ref_routing = self._load(trainable=False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / (warm + 1)))
        self.step = 0
        self.policy_version = 0
        self._pending_ckpt = None  # (future, temp dir, final dir) of a background checkpoint write
        self._ckpt_group = None  # the gloo group background writes use

    # ------------------------------------------------------------------------------------------ setup
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load(self, trainable: bool):
        """The model, sharded with FSDP2 when there is something to shard (several ranks, or bf16 mixed
        precision). Sharded models are built on the meta device and materialised shard by shard: rank 0 reads
        the checkpoint into CPU memory and broadcasts it (no rank ever holds the full model on its GPU)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoConfig, AutoModelForCausalLM

        shard = self.world_size > 1 or self.cfg.param_dtype != "float32"
        if shard:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.cfg.model), dtype=torch.float32)
            maybe_install_dsa(model, self.cfg.model)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=torch.float32)
            maybe_install_dsa(model, self.cfg.model)  # before sharding: the indexers shard with their layers
            model = model.to(self.device)
        model.set_output_embeddings(ChunkedLogprobHead(model.get_output_embeddings(), compiled=self.cfg.compile))
        routing = RoutingController(model)  # patch the routers before sharding wraps the layers
        if trainable and self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.compile:
            for layer in _decoder_layers(model):
                layer.compile(dynamic=True)
        # One fp32 rank has nothing to shard: FSDP2 would only copy every parameter into unsharded
        # buffers at each forward and backward (measured: 0.75x TRL's tokens/s on a 0.4B model with it).
        if shard:
            mp = MixedPrecisionPolicy(param_dtype=getattr(torch, self.cfg.param_dtype), reduce_dtype=torch.float32)
            if self.cfg.fsdp_wrap == "layer":
                for layer in _decoder_layers(model):
                    fully_shard(layer, mp_policy=mp)
            elif self.cfg.fsdp_wrap != "model":
                raise ValueError(f"fsdp_wrap: layer | model, got {self.cfg.fsdp_wrap!r}")
            fully_shard(model, mp_policy=mp)
            if self.world_size == 1:  # FSDP2 casts and reduces there tensor by tensor, or copying twice
                _unshard_with_one_cast_at_one_rank()
                _flat_grad_copy_in_at_one_rank()
                _reduce_in_place_at_one_rank(model)
            model.to_empty(device=self.device)
            self._load_from_rank0(model)
        if not trainable:
            model.eval().requires_grad_(False)
        else:
            model.train()
        return model, routing

    def _load_from_rank0(self, model) -> None:
        """Fill a materialised (uninitialised) sharded model from the checkpoint read by rank 0: parameters
        through a full-state-dict broadcast, buffers (rotary tables, which no state dict holds) likewise."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from transformers import AutoModelForCausalLM

        full = None
        if self.rank == 0:
            full = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=torch.float32)
            maybe_install_dsa(full, self.cfg.model)
        set_model_state_dict(model, full.state_dict() if full is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        src = dict(full.named_buffers()) if full is not None else {}
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if full is not None:
                    buf.copy_(src[name])
                if self.world_size > 1:
                    dist.broadcast(buf, 0)
        del full

    # ---------------------------------------------------------------------------------------- forward
    @contextmanager
    def _routing(self, routing, mb: TrainBatch, engine_samples: bool):
        """Replay the engine's experts (keep routing) or capture the router's own (to measure agreement)
        around a forward *and* its backward: gradient-checkpointed layers re-run their routers in backward,
        which must pick the same experts. Yields the recorded ids `[B*T, layers, k]`, or None."""
        if not (engine_samples and mb.routed_experts is not None and routing.is_moe):
            yield None
            return
        routed = to_device(mb.routed_experts.reshape(-1, *mb.routed_experts.shape[2:]), self.device)
        with routing.replay(routed) if self.cfg.keep_routing else routing.capture():
            yield routed

    def _budget(self):
        """The partitioner's activation budget while a training forward (the loss's, DSA's warm-up) compiles: it
        splits forward from backward then. A context, not a process-wide setting, which would reach other compiled
        code of the process. Not covered:
        two learners with different budgets in one process share the layers' compiled graphs (dynamo caches them by
        code, and does not guard on this setting), so the first to compile sets the budget for both."""
        if not self.cfg.compile:
            return nullcontext()
        from torch._functorch import config as functorch_config

        return functorch_config.patch(activation_memory_budget=self.cfg.activation_memory_budget)

    def _forward(self, model, routing, mb: TrainBatch, engine_samples: bool, routed, stats: bool = True):
        """Per-position log-probs `[B, T]` of the targets (differentiable) and their statistics: entropy and
        kept_mass `[B, T]` (None unless `stats`: they cost two passes over each chunk's logits), routing
        agreement. Engine samples use the engine's kept sets and temperature."""
        head = model.get_output_embeddings()
        kept = mb.kept if (engine_samples and self.cfg.keep_sampling_mask) else None
        # Only the loss's positions (responses; LossInputs leaves the others free): the head is the step's
        # largest cost at a 150k vocabulary, and prompts are often a fifth of the tokens or more.
        at = to_device((mb.loss_mask.reshape(-1) > 0).nonzero().squeeze(1), self.device)
        head.request = (to_device(mb.targets, self.device), kept, self.cfg.logprob_chunk,
                        self.cfg.temperature if engine_samples else 1.0, at, stats)
        try:
            with self._budget():
                logp = model(input_ids=to_device(mb.input_ids, self.device), attention_mask=to_device(mb.attention_mask, self.device),
                             use_cache=False).logits  # [B, T] via the head
        finally:
            head.request = None
        out = {"entropy": head.entropy, "kept_mass": head.kept_mass}
        if routed is not None:
            if routing.mode == "capture":
                routing.own_topk = list(routing.take_captured()[0].long().unbind(1))
            out["routing_agreement"] = routing.agreement(routed, to_device(mb.loss_mask, self.device))
        return logp, out

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> list[list[float]]:
        """The current policy's log-probs of each sample's response tokens (as the loss sees them)."""
        batch = collate(samples, use_sampling_mask=self.cfg.keep_sampling_mask)
        with self._routing(self.routing, batch, True) as routed:
            logp, _ = self._forward(self.model, self.routing, batch, True, routed, stats=False)
        _reshard(self.model)
        return [logp[b][batch.loss_mask[b] > 0].tolist() for b in range(len(samples))]

    @torch.no_grad()
    def _ref_logprobs(self, mb: TrainBatch) -> torch.Tensor:
        """log pi_ref `[B, T]`, computed like log pi_theta: the engine's replayed experts and its kept sets.
        The KL then compares the two policies on the same routing and the same truncated support that the
        ratio uses, so it measures how far the weights moved, not router or truncation noise; at step 0
        (reference == policy) it is exactly 0 (tests/rl/test_learner.py)."""
        with self._routing(self.ref_routing, mb, True) as routed:
            logp = self._forward(self.ref, self.ref_routing, mb, True, routed, stats=False)[0]
        _reshard(self.ref)
        return logp

    # ------------------------------------------------------------------------------------------- step
    def reset_reference(self) -> None:
        """Make the reference model the current policy (V3.2: the KL anchors RL to its own starting point,
        e.g. the SFT model after distillation). Same sharding, so the sharded state dicts load directly."""
        if self.ref is not None:
            with torch.no_grad():
                for p_ref, p in zip(self.ref.parameters(), self.model.parameters()):
                    p_ref.copy_(p)

    def set_lr(self, lr: float) -> None:
        """A new base learning rate (e.g. between the SFT and RL stages); the warm-up schedule scales it."""
        self.scheduler.base_lrs = [lr for _ in self.optimizer.param_groups]
        for g, f in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            g["lr"] = lr * f(self.scheduler.last_epoch)

    def train_step(self, samples: list[Sample], plan: "StepPlan", loss: str | None = None) -> dict[str, float]:
        """One optimiser step on this rank's `samples`; `plan` holds the step's totals over all ranks and
        the number of micro-batches every rank runs (see `plan_step`). `loss` overrides the configured
        policy loss (the SFT stage). Returns metrics (all-reduced over ranks)."""
        sums = self.accumulate_grads(samples, plan, loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return self._reduce_metrics(sums, grad_norm)

    def dsa_warmup_step(self, samples: list[Sample], lr: float) -> float:
        """V3.2's dense warm-up: the main model frozen, only the indexers train, with KL to the (dense) main
        attention. Returns the KL. Uses its own optimiser so the main model's Adam state is untouched."""
        if not hasattr(self, "_warmup_opt"):
            idx = [p for n, p in self.model.named_parameters() if ".indexer." in n]
            if not idx:
                raise ValueError("dsa_warmup_step: the model has no DSA indexer (model.dsa_top_k not set)")
            self._warmup_opt = torch.optim.AdamW(idx, lr=lr)
        batch = collate(samples, use_sampling_mask=False)
        top_k = [a._dsa_top_k for a in attention_modules(self.model)]
        for a in attention_modules(self.model):  # dense: every causal key selected
            a._dsa_top_k = 1 << 30
        keep_for_loss(self.model, True)
        was_trainable = [p.requires_grad for p in self.model.parameters()]
        try:
            for n, p in self.model.named_parameters():
                p.requires_grad_(".indexer." in n)
            with self._budget():  # a training forward too: the layers may compile here first
                self.model(input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device),
                           use_cache=False)
            loss = DSA_LOSSES.get("dense_warmup")(layer_states(self.model), batch.attention_mask.to(self.device) > 0)
            loss.backward()
            self._warmup_opt.step()
            self._warmup_opt.zero_grad(set_to_none=True)
        finally:
            for p, g in zip(self.model.parameters(), was_trainable):
                p.requires_grad_(g)
            for a, k in zip(attention_modules(self.model), top_k):
                a._dsa_top_k = k
            keep_for_loss(self.model, False)
        return loss.item()

    def zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def apply(self, fn, *args):
        """`fn(self, *args)` on this rank: a diagnostic or user hook, run on every rank by
        `LearnerGroup.apply` (a `fn` that gathers sharded tensors must run on all of them)."""
        return fn(self, *args)

    def accumulate_grads(self, samples: list[Sample], plan: "StepPlan", loss: str | None = None) -> dict[str, list[float]]:
        """Forward + backward over this rank's micro-batches; gradients accumulate, no optimiser step.
        Algorithm-blind: the registered loss says what it needs (reference, engine samples). Returns
        {metric: [token-weighted sum, tokens]} over the micro-batches (`metric_means` turns it into means)."""
        cfg = self.cfg
        spec = algos.POLICY_LOSSES.get(loss or cfg.loss)
        engine = spec.uses_engine_samples
        self.model.train()
        batch = collate(samples, cfg.kl_coefs, use_sampling_mask=cfg.keep_sampling_mask,
                        require_routing=engine and cfg.require_routing,
                        require_sampling_mask=engine and cfg.require_sampling_mask)
        micro = split(batch, cfg.micro_batch_size)
        if cfg.dsa_loss:  # the sparse stage: indexer KL on its selected set, its input detached
            keep_for_loss(self.model, True, detach_indexer_input=cfg.dsa_loss == "sparse")
        # Every rank must run the same number of forwards (FSDP collectives); pad with loss-free copies.
        while len(micro) < plan.num_micro:
            micro.append(_without_loss(micro[0]))
        # No reference forward for micro-batches whose every domain has beta = 0 (V3.2: math), unless another
        # rank's micro-batch at the same position needs one: the sharded reference's forward is collective.
        want_refs = [False] * len(micro)
        if spec.needs_reference and self.ref is not None:  # the same on every rank: no collective otherwise
            want_refs = self._any_rank([bool((mb.kl_coef != 0).any()) for mb in micro])
        # Metrics stay on the device until every backward is queued (`_host_sums`): reading one mid-step would
        # leave the GPU idle while the host catches up.
        sums: dict[str, list] = {}
        dev = lambda t: to_device(t, self.device)  # noqa: E731
        for mb, want_ref in zip(micro, want_refs):
            mask = dev(mb.loss_mask)
            logp_ref = self._ref_logprobs(mb) if want_ref else None
            with self._routing(self.routing, mb, engine) as routed:
                logp, stats = self._forward(self.model, self.routing, mb, engine, routed)
                out = spec.fn(algos.LossInputs(logp, mask, plan.totals, logp_old=dev(mb.logp_old), logp_ref=logp_ref,
                                               advantages=dev(mb.advantages), kl_coef=mb.kl_coef), cfg.loss_cfg)
                loss, metrics = out.loss, dict(out.metrics)
                if cfg.dsa_loss:
                    idx_loss = DSA_LOSSES.get(cfg.dsa_loss)(layer_states(self.model), dev(mb.attention_mask) > 0)
                    # A per-micro-batch mean: weight it by the micro-batch's share of the step's sequences.
                    loss = loss + cfg.dsa_loss_coef * idx_loss * (mb.input_ids.shape[0] / plan.totals.num_seqs)
                    metrics["dsa_indexer_kl"] = idx_loss.detach()
                (loss * self.world_size).backward()  # FSDP2 averages gradients over ranks: undo it
            metrics["entropy"] = algos.masked_mean(stats["entropy"], mask)
            if mb.kept is not None and engine and cfg.keep_sampling_mask:
                metrics["kept_mass"] = algos.masked_mean(stats["kept_mass"], mask)
            if "routing_agreement" in stats:
                metrics["routing_agreement"] = stats["routing_agreement"]
            n_tok = float(mb.loss_mask.sum())  # on the host
            for k, v in metrics.items():  # (token-weighted sum, tokens) per metric, over micro-batches and ranks
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] = acc[0] + (v.detach() if torch.is_tensor(v) else v) * n_tok
                acc[1] += n_tok
            acc = sums.setdefault("loss", [0.0, 1.0])  # already normalised by the step's totals: a sum
            acc[0] = acc[0] + loss.detach()
        if cfg.dsa_loss:
            keep_for_loss(self.model, False)
        return _host_sums(sums, self.device)

    def _any_rank(self, flags: list[bool]) -> list[bool]:
        """Per position, whether any rank's flag is set (one all-reduce; the ranks pass equally long lists)."""
        if not (dist.is_initialized() and self.world_size > 1) or not flags:
            return flags
        t = torch.tensor(flags, dtype=torch.int32, device=self.device)  # on the rank's device: NCCL has no CPU backend
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _reduce_metrics(self, sums: dict, grad_norm: float) -> dict[str, float]:
        """Each metric's token-weighted mean over the tokens it was measured on, over all ranks. A metric may
        be missing on some micro-batches or ranks (kept_mass where no sample has kept sets, routing_agreement
        where none has routed experts): the ranks reduce the union of their keys, each with its own tokens."""
        keys = sorted(sums)
        if dist.is_initialized() and self.world_size > 1:
            every: list = [None] * self.world_size
            dist.all_gather_object(every, keys)
            keys = sorted(set().union(*every))
        # On the rank's device: an NCCL process group (GPU) has no backend for CPU tensors.
        t = torch.tensor([sums.get(k, [0.0, 0.0]) for k in keys], dtype=torch.float64, device=self.device).reshape(-1, 2)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(t)
        out = metric_means(dict(zip(keys, t.tolist())))
        out.update(grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0], skipped=float(not math.isfinite(grad_norm)))
        return out

    # ------------------------------------------------------------------------------- weights & state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model weights on CPU (every rank must call; all get the full dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def push_weights(self, spec, engines: list, version: int):
        """Stream the weights to `engines` (Ray actor handles) through `spec.transport`
        (`rollout.weight_transfer.push`): every rank gathers one tensor at a time, rank 0 sends. Returns rank 0's
        `Pushed` (None on the other ranks); every rank must call."""
        from rollout.weight_transfer import push, sync_state

        out = push(sync_state(self.model), spec, engines, version, send=self.rank == 0, cache=self._sync_cache)
        self.policy_version = version
        return out

    def placement(self) -> tuple[str, tuple[str, ...]]:
        """(Ray node id, GPU ids) of this rank (inside a Ray actor)."""
        from rollout.weight_transfer import placement

        return placement()

    def export_hf(self, out_dir: str, bucket_mb: int = 512, version: int | None = None) -> str | None:
        """Write the current weights as a HF checkpoint (rank 0 writes; every rank must call)."""
        from rollout.weights import export_hf_checkpoint

        sd = self.full_state_dict()
        path = None
        if self.rank == 0:  # FSDP2 keeps the HF class (as a subclass): save_pretrained works with the full dict
            path = str(export_hf_checkpoint(self.model, out_dir, self.cfg.model, bucket_mb, state_dict=sd))
        if version is not None:
            self.policy_version = version
        if dist.is_initialized():
            dist.barrier()
        return path

    def save_checkpoint(self, ckpt_dir: str, extra: dict | None = None, wait: bool = True) -> list[str]:
        """Model, optimizer and reference sharded with `torch.distributed.checkpoint` (each rank writes its own
        shards: nothing is gathered on one rank, and a later run may load them at another world size), plus
        rank 0's `meta.pt`: scheduler, RNG, step, version, config and the caller's `extra` (data position...).
        Written to a temp dir, sealed by a COMPLETE marker once every rank's shards are written, then renamed
        into place: a crash leaves the previous checkpoint intact. `wait=False` returns once the state is
        staged in CPU memory and writes in a background thread (on a gloo group of its own, so that it never
        interleaves with training's collectives); the next save or `finish_checkpoint` seals it. Returns the
        checkpoint dirs sealed by this call (the pending one first). Every rank must call."""
        import torch.distributed.checkpoint as dcp

        sealed = self.finish_checkpoint()
        out = Path(ckpt_dir)
        tmp = out.with_name(f".{out.name}.tmp")
        stepped = bool(self.optimizer.state)  # every rank steps together, so all agree
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save({"scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "step": self.step,
                        "policy_version": self.policy_version, "has_reference": self.ref is not None,
                        "config": asdict(self.cfg), "world_size": self.world_size, "extra": extra or {},
                        "optimizer_stepped": stepped}, tmp / "meta.pt")
        dist.barrier()
        state = self._sharded_state(stepped)
        if wait:
            dcp.save(state, checkpoint_id=str(tmp / "sharded"))
            return [*sealed, self._seal(tmp, out)]
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo")
        self._pending_ckpt = (dcp.async_save(state, checkpoint_id=str(tmp / "sharded"), process_group=self._ckpt_group),
                              tmp, out)
        return sealed

    def finish_checkpoint(self) -> list[str]:
        """Wait for a background checkpoint write and seal it; the sealed dir (or none). Every rank must call."""
        if self._pending_ckpt is None:
            return []
        future, tmp, out = self._pending_ckpt
        self._pending_ckpt = None
        future.result()
        return [self._seal(tmp, out)]

    def _seal(self, tmp: Path, out: Path) -> str:
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            (tmp / "COMPLETE").write_text("ok\n")  # written last: its presence means the state is whole
            replace_dir(tmp, out)
        dist.barrier()
        return str(out)

    def _sharded_state(self, with_optimizer: bool) -> dict:
        """What DCP saves and loads: this rank's shards (plain tensors on one unsharded rank). An optimizer
        that has not stepped yet is left out: DCP's state dict would initialise it by a zero-gradient step,
        and the resumed AdamW would then start at step 2 (a different bias correction) instead of step 1."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if with_optimizer:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
        else:
            state = {"model": get_model_state_dict(self.model)}
        if self.ref is not None:  # after distillation the reference is the distilled model, not the init
            state["reference"] = get_model_state_dict(self.ref)
        return state

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        """Restore what `save_checkpoint` wrote, at this run's world size (DCP reshards); the caller's `extra`."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        path = Path(ckpt_dir)
        if self.rank == 0:
            recover_dir(path)
        dist.barrier()
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"checkpoint '{ckpt_dir}' is incomplete or missing (no COMPLETE marker)")
        if not (path / "meta.pt").is_file():
            raise ValueError(f"checkpoint '{ckpt_dir}' was written by an older version (one state.pt, before sharded "
                             "checkpoints): resume it with that version, or start a new run dir")
        meta = torch.load(path / "meta.pt", weights_only=False)
        if self.ref is not None and not meta["has_reference"]:
            raise ValueError(f"checkpoint '{ckpt_dir}' has no reference model, but this run's KL needs one "
                             "(algo.kl_coef > 0): it was saved by a run without KL")
        stepped = meta.get("optimizer_stepped", True)
        state = self._sharded_state(stepped)
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        if stepped:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        else:  # the optimizer stays fresh (its learning rate is set from the scheduler below)
            set_model_state_dict(self.model, state["model"])
        if self.ref is not None:
            set_model_state_dict(self.ref, state["reference"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if not stepped:  # a restored optimizer's groups hold their learning rate; a fresh one's take the schedule's
            self.set_lr(self.scheduler.base_lrs[0])
        _set_rng_state(meta["rng"])
        self.step, self.policy_version = meta["step"], meta["policy_version"]
        return meta["extra"]

    def shutdown(self) -> None:
        if dist.is_initialized():
            self.finish_checkpoint()  # a background write is sealed, not left half-done
            dist.destroy_process_group()


def _reshard(model) -> None:
    """After a forward with no backward: FSDP2 keeps the root module's parameters unsharded after forward
    (for the backward that usually follows), and a later state-dict load then meets plain tensors where it
    expects DTensors ("mixed torch.Tensor and DTensor")."""
    if hasattr(model, "reshard"):
        model.reshard()


def _without_loss(mb: TrainBatch) -> TrainBatch:
    from dataclasses import replace

    return replace(mb, loss_mask=torch.zeros_like(mb.loss_mask), kl_coef=torch.zeros_like(mb.kl_coef))  # no reference forward for it


def _unshard_with_one_cast_at_one_rank() -> None:
    """At one rank FSDP2 "unshards" a unit parameter by parameter: each fp32 parameter is cast into a new bf16
    tensor, then copied into its unsharded buffer. That is two kernels and tens of microseconds of host time per
    parameter, before every forward and every backward: 267 parameters of the 0.4B dense model as one unit took
    10-23 ms of host time a pass for 2 ms of kernels, with the GPU waiting (bench/README.md). Instead every buffer of
    the unit is filled by one foreach copy (it casts), and FSDP's own loop is handed the filled buffers as its
    inputs: it then copies each buffer onto itself, which torch skips. Parameters with FSDP extensions, CPU offload
    or a post-forward shard keep FSDP's path, as do other world sizes. Idempotent (a process may build several
    learners)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ShardedState, alloc_storage
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    if getattr(FSDPParamGroup, "one_cast_at_one_rank", False):  # installed (and maybe taken back by a test)
        return
    fsdp_unshard = FSDPParamGroup.wait_for_unshard
    fsdp_inputs = FSDPParam.all_gather_inputs  # a property: the cast parameter

    def all_gather_inputs(param) -> list[torch.Tensor]:
        filled = param.__dict__.get("_filled_at_one_rank")
        return [filled] if filled is not None else fsdp_inputs.fget(param)

    def plain(param) -> bool:
        return (param.sharded_state == ShardedState.SHARDED and not param.offload_to_cpu
                and not hasattr(param._sharded_local_tensor, "fsdp_pre_all_gather"))

    def wait_for_unshard(group) -> None:
        params, result = group.fsdp_params, group._all_gather_result
        sharded = hasattr(group.mesh_info, "shard_process_group")  # FSDP's test: an FSDP mesh, else world size 1
        world = group._all_gather_process_group.size() if sharded else 1
        if result is None or result.all_gather_work is not None or world != 1 or not all(plain(p) for p in params):
            return fsdp_unshard(group)
        bufs = []
        for p in params:
            p.init_all_gather_outputs([p._sharded_param_data.numel()], [p.param_dtype or p.orig_dtype], 1, group.device)
            alloc_storage(p.all_gather_outputs[0])
            bufs.append(p.all_gather_outputs[0])
        # The buffers may be saved for backward (the unsharded parameters are views of them): refilling them with
        # the same weights must not look like a mutation to autograd, as in FSDP's own copy.
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tuple(bufs)):
            torch._foreach_copy_(bufs, [p._sharded_param_data for p in params])
        try:
            for p, buf in zip(params, bufs):
                p.__dict__["_filled_at_one_rank"] = buf
            return fsdp_unshard(group)
        finally:
            for p in params:
                p.__dict__.pop("_filled_at_one_rank", None)

    wait_for_unshard.fsdp = fsdp_unshard
    FSDPParamGroup.one_cast_at_one_rank = True
    FSDPParam.all_gather_inputs = property(all_gather_inputs)
    FSDPParamGroup.wait_for_unshard = wait_for_unshard


def _flat_grad_copy_in_at_one_rank() -> None:
    """After each unit's backward, FSDP2 copies its gradients into one reduce-scatter buffer with `fsdp.chunk_cat`.
    On CUDA that op builds its block table on the host, one entry per 2 KB of gradient, before it launches: about
    20 ms of host time for the 0.4B dense model as one unit, with the GPU idle (its timeline in bench/README.md).
    With one rank the buffer is the gradients flattened end to end (no padding, one chunk), so one foreach copy
    fills it: host time per tensor, not per byte. Other world sizes keep FSDP's copy. Idempotent (a process may
    build several learners)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as fc

    chunk_cat_copy_in = fc.foreach_reduce_scatter_copy_in
    if getattr(chunk_cat_copy_in, "flat_at_one_rank", False):
        return

    def copy_in(unsharded_grads: list[torch.Tensor], reduce_scatter_input: torch.Tensor, world_size: int) -> None:
        sizes = [g.numel() for g in unsharded_grads]
        if world_size != 1 or sum(sizes) != reduce_scatter_input.numel():
            return chunk_cat_copy_in(unsharded_grads, reduce_scatter_input, world_size)
        torch._foreach_copy_(list(reduce_scatter_input.split(sizes)), [g.reshape(-1) for g in unsharded_grads])

    copy_in.flat_at_one_rank, copy_in.chunk_cat = True, chunk_cat_copy_in
    fc.foreach_reduce_scatter_copy_in = copy_in


def _reduce_in_place_at_one_rank(model) -> None:
    """At one rank FSDP2's "reduce-scatter" copies the fp32 gradient buffer into a second one of the same size,
    whose views become the gradients: both are alive at once, 2 x 4 bytes a parameter (6.8 GB for the 0.85B MoE,
    most of its step's peak). Give every FSDP unit a reduce-scatter whose output is its input buffer (the copy is
    then a no-op): the gradients are views of the buffer the copy-in filled. Skipped where this torch lacks
    custom reduce-scatters."""
    from torch.distributed.fsdp import FSDPModule

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError:
        return

    class InPlace(ReduceScatter):
        def __init__(self):
            # The input buffer (weakly: FSDP holds it while it asks for the output; a torch whose reduction asks
            # only for an output must not have it kept alive here) and the stream it was allocated on.
            self.pending: tuple[weakref.ref, object] | None = None

        def allocate(self, size, *, dtype, device) -> torch.Tensor:
            """FSDP asks for the input (on the compute stream), then for the output of the same numel (on its
            reduce-scatter stream): hand the input back once, as the output."""
            device = torch.device(device)
            stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
            pending, self.pending = self.pending, None
            buf, made_on = (pending[0](), pending[1]) if pending is not None else (None, None)
            if (buf is not None and buf.numel() == math.prod(int(n) for n in size) and buf.dtype == dtype
                    and buf.device == device and (stream is None or stream != made_on)):  # not a second input
                if stream is not None:
                    # From the second micro-batch FSDP accumulates this buffer into the gradients on the
                    # reduce-scatter stream and may drop it before that has run: keep its memory from being
                    # reused on the compute stream until then (FSDP's own output comes from that stream's pool).
                    buf.record_stream(stream)
                return buf.view(*size)
            buf = torch.empty(*size, dtype=dtype, device=device)
            self.pending = (weakref.ref(buf), stream)
            return buf

        def __call__(self, output_tensor, input_tensor, group=None, op=None, async_op=False):
            if output_tensor.data_ptr() != input_tensor.data_ptr():  # one rank: the sum is the input
                output_tensor.copy_(input_tensor)
            return None

    for module in model.modules():
        if isinstance(module, FSDPModule) and hasattr(module, "set_custom_reduce_scatter"):
            module.set_custom_reduce_scatter(InPlace())


def _decoder_layers(model) -> list[torch.nn.Module]:
    base = getattr(model, model.base_model_prefix)
    return list(base.layers)


class ChunkedLogprobHead(torch.nn.Module):
    """Stands in for the LM head so the model's own forward (and FSDP's hooks on it) runs unchanged, but
    returns the targets' log-probs `[B, T]` from `token_logprobs` instead of `[B, T, V]` logits while a
    `request` is set. Holds the same weight Parameter (tied embeddings stay tied)."""

    def __init__(self, linear: torch.nn.Module, compiled: bool = False):
        super().__init__()
        self.weight = linear.weight
        self.compiled = compiled  # trainer.compile: the chunks' softmax passes compiled (rl.logprobs)
        self.request = None  # (targets [B, T], KeptBatch or None, chunk size, temperature, positions, stats wanted)
        self.entropy = self.kept_mass = None  # [B, T] of the last request (no gradient)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.request is None:
            return torch.nn.functional.linear(hidden, self.weight)
        targets, kept, chunk, temperature, at, stats = self.request  # at: the flat positions to compute, ascending
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, at)
        res = algos.token_logprobs(h, self.weight, targets.reshape(-1).index_select(0, at), chunk,
                                   kept_ids=kept.select(at) if kept is not None else None,
                                   temperature=temperature, return_stats=stats, compiled=self.compiled)
        logp, ent, mass = res if stats else (res, None, None)
        # Elsewhere: log-prob 0, entropy 0, kept mass 1 (positions without a loss; never read).
        def spread(x: torch.Tensor, fill: float) -> torch.Tensor:  # a new [B, T] tensor, not a view: FSDP2 hooks the output
            out = x.new_full(targets.shape, fill)
            out.view(-1).index_copy_(0, at, x)
            return out

        self.entropy, self.kept_mass = (spread(ent, 0.0), spread(mass, 1.0)) if stats else (None, None)
        return spread(logp, 0.0)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


@dataclass(frozen=True)
class StepPlan:
    totals: algos.StepTotals  # the loss normalisers over all samples of the step (before the split over ranks)
    num_micro: int  # micro-batches every rank runs (the busiest rank's count; FSDP needs equal counts)


def _host_sums(sums: dict[str, list], device) -> dict[str, list[float]]:
    """`sums` with its device tensors read in one transfer (one wait for the device, after the step's backwards)."""
    where = [(k, i) for k, v in sums.items() for i in (0, 1) if torch.is_tensor(v[i])]
    if not where:
        return sums
    values = torch.stack([to_device(sums[k][i].double().reshape(()), device) for k, i in where]).tolist()
    out = {k: list(v) for k, v in sums.items()}
    for (k, i), x in zip(where, values):
        out[k][i] = x
    return out


def metric_means(sums: dict[str, list[float]]) -> dict[str, float]:
    """{metric: [token-weighted sum, tokens]} -> each metric's mean over its own tokens (loss: its sum, since
    it is already normalised by the step's totals); 0 for a metric whose micro-batches had no loss token."""
    return {k: (v if k == "loss" else v / n if n > 0 else 0.0) for k, (v, n) in sums.items()}


def plan_step(samples: list[Sample], world_size: int = 1, micro_batch_size: int = 1) -> StepPlan:
    totals = algos.StepTotals(num_seqs=len(samples), num_tokens=sum(sum(s.loss_mask) for s in samples),
                              max_len=max((len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples), default=1))
    return StepPlan(totals, math.ceil(math.ceil(len(samples) / world_size) / micro_batch_size))


def _rendezvous() -> tuple[str, int]:
    """Runs in rank 0's placement-group bundle, i.e. on rank 0's node: that node's address and a free port."""
    import ray

    from rollout.weight_transfer import free_port

    return ray.util.get_node_ip_address(), free_port()


class LearnerGroup:
    """`world_size` Learner ranks as Ray actors (one process each), driven as one. The ranks live in a
    placement group (`placement`: 'pack' keeps them on as few nodes as possible, 'spread' on as many), each
    bundle `num_cpus` + `num_gpus` + the custom `resources` (which pin ranks to nodes offering them); the
    process group meets at rank 0's node, on a port free there."""

    def __init__(self, cfg: LearnerConfig, world_size: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                 resources: dict | None = None, placement: str = "pack", placement_timeout_s: float = 300.0):
        import threading

        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resources = dict(resources or {})
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
        self.pg = placement_group([bundle] * world_size, strategy=placement.upper())
        self.world_size, self.micro_batch_size = world_size, cfg.micro_batch_size
        self._submit = threading.Lock()  # calls from two threads reach every rank in the same order
        self.actors = []
        try:
            if not ray.wait([self.pg.ready()], timeout=placement_timeout_s)[0]:
                raise LearnerFailure(f"the learner's placement group ({world_size} x {bundle}, {placement}) was not "
                                     f"placed in {placement_timeout_s:.0f} s: no node offers these resources")
            at = [PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r) for r in range(world_size)]
            cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources)(Learner)
            for attempt in range(3):
                addr, port = ray.get(ray.remote(num_cpus=0)(_rendezvous).options(scheduling_strategy=at[0]).remote())
                self.actors = [cls.options(scheduling_strategy=at[r]).remote(cfg, r, world_size, port, addr)
                               for r in range(world_size)]
                try:
                    ray.get([a.__ray_ready__.remote() for a in self.actors])
                    break
                except ray.exceptions.RayActorError as exc:
                    # The port was free when _rendezvous looked and taken before rank 0 listened on it (another
                    # process on the node, Ray's own workers): meet on another port. Any other failure is final.
                    if attempt == 2 or "EADDRINUSE" not in str(exc):
                        raise
                    for a in self.actors:
                        ray.kill(a)
                    self.actors = []
        except BaseException:
            self.kill()
            raise

    def _all(self, method: str, *args_per_rank, timeout: float | None = None):
        """Call `method` on every rank; the first rank that dies or raises fails the call at once, naming
        the rank (the survivors would otherwise wait in a collective)."""
        import ray

        with self._submit:
            refs = [getattr(a, method).remote(*(x[r] if isinstance(x, _PerRank) else x for x in args_per_rank))
                    for r, a in enumerate(self.actors)]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise LearnerFailure(f"learner ranks {[refs.index(p) for p in pending]} did not finish {method} in {timeout} s")
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                raise LearnerFailure(f"learner rank {refs.index(done[0])} died during {method}: {type(exc).__name__}") from None
            except ray.exceptions.RayTaskError as exc:
                raise LearnerFailure(f"learner rank {refs.index(done[0])} failed in {method}: {exc.cause!r}") from None
        return ray.get(refs)

    def train_step(self, samples: list[Sample], loss: str | None = None) -> dict[str, float]:
        if len(samples) < self.world_size:
            raise ValueError(f"train_step: {len(samples)} samples for {self.world_size} learner ranks")
        shards = _PerRank([samples[r :: self.world_size] for r in range(self.world_size)])
        return self._all("train_step", shards, plan_step(samples, self.world_size, self.micro_batch_size), loss)[0]

    def set_lr(self, lr: float) -> None:
        self._all("set_lr", lr)

    def reset_reference(self) -> None:
        self._all("reset_reference")

    def dsa_warmup_step(self, samples: list[Sample], lr: float) -> float:
        return self._all("dsa_warmup_step", _PerRank([samples[r :: self.world_size] for r in range(self.world_size)]), lr)[0]

    def apply(self, fn, *args) -> list:
        """`fn(learner, *args)` on every rank (`Learner.apply`); each rank's result, in rank order."""
        return self._all("apply", fn, *args)

    def logprobs(self, samples: list[Sample]) -> list[list[float]]:
        return self._all("logprobs", samples)[0]

    def export_hf(self, out_dir: str, bucket_mb: int = 512, version: int | None = None) -> str:
        return self._all("export_hf", out_dir, bucket_mb, version)[0]

    def push_weights(self, spec, engines: list, version: int):
        """The weights to `engines` without the file system (`Learner.push_weights`); rank 0's `Pushed`."""
        return self._all("push_weights", spec, engines, version)[0]

    def placement(self) -> tuple[str, tuple[str, ...]]:
        """Rank 0's (node id, GPU ids): where the weights leave from."""
        import ray

        return ray.get(self.actors[0].placement.remote())

    def save_checkpoint(self, ckpt_dir: str, extra: dict | None = None, wait: bool = True) -> list[str]:
        return self._all("save_checkpoint", ckpt_dir, extra, wait)[0]

    def finish_checkpoint(self) -> list[str]:
        return self._all("finish_checkpoint")[0]

    def load_checkpoint(self, ckpt_dir: str) -> dict:
        return self._all("load_checkpoint", ckpt_dir)[0]

    def shutdown(self) -> None:
        try:
            self._all("shutdown", timeout=30)
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill every rank and free their placement group (no clean shutdown: for ranks that died or hang)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)


class LearnerFailure(RuntimeError):
    """A learner rank died, raised or hung; the message names the rank."""


class _PerRank(list):
    """Marks an argument that differs per rank."""
