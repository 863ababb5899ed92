"""One construction path from the config to every component: the rollout engines, the learner, the scorers
and the sampling settings. The driver, distillation, evaluation and `rl.synthesize` all build through
here, so a config key that is wired here reaches every path (torchtune's `config.instantiate`, by hand).

The corrections decide the engine's captures (`captures`): keep routing on a MoE model turns on
routed-expert capture, keep sampling mask with truncating sampling turns on sampling masks, and the
learner is told to require them (a sample without one is an error, never a silent fallback).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rl.config import Config, RolloutConfig, agent_runner, domain_betas, model_is_moe
from rollout.engine import EngineConfig, SamplingConfig, captures_needed, is_moe_checkpoint


@dataclass(frozen=True)
class Captures:
    routing: bool  # routed experts per token (keep routing)
    sampling_mask: bool  # kept sets per token (keep sampling mask)


def captures(cfg: Config, model: str | None = None) -> Captures:
    """What the engines must capture for this config's corrections (`model`: the checkpoint that runs)."""
    moe = is_moe_checkpoint(model) if model and (Path(model) / "config.json").is_file() else model_is_moe(cfg)
    rollout, algo = cfg.rollout, cfg.algo
    return Captures(*captures_needed(algo.keep_routing, algo.keep_sampling_mask, moe, rollout.top_k, rollout.top_p))


def engine_config(rollout: RolloutConfig, model: str, seed: int = 0, want: Captures = Captures(False, False)) -> EngineConfig:
    """The engine settings of `rollout.*` for `model` (resolved: no 'auto' left, see rl.config.resolve_auto)."""
    return EngineConfig(model=model, engine=rollout.engine, dtype=rollout.dtype, max_model_len=rollout.max_model_len,
                        tensor_parallel_size=rollout.tensor_parallel_size, enforce_eager=bool(rollout.enforce_eager),
                        gpu_memory_utilization=rollout.gpu_memory_utilization or 0.4, seed=seed,
                        enable_return_routed_experts=want.routing, return_sampling_mask=want.sampling_mask,
                        extra=dict(rollout.extra))


def engines(cfg: Config, model: str, want: Captures | None = None):
    """The rollout engines (Ray actors behind a RolloutManager) for `model`; captures from the config
    unless `want` says otherwise (distillation's specialists need none)."""
    from rollout.manager import RolloutManager

    rollout = cfg.rollout
    ecfg = engine_config(rollout, model, cfg.trainer.seed, captures(cfg, model) if want is None else want)
    return RolloutManager(ecfg, rollout.num_engines, rollout.chunk_prompts, num_cpus=rollout.engine_cpus, num_gpus=rollout.engine_gpus or 0,
                          resources=dict(rollout.engine_resources))


def learner_config(cfg: Config, model: str, kl_coefs: dict[str, float]):
    from rl.algos import LossConfig
    from rl.learner import LearnerConfig

    algo, trainer = cfg.algo, cfg.trainer
    want = captures(cfg, model)
    return LearnerConfig(
        model=model, lr=trainer.lr, warmup_steps=trainer.warmup_steps, grad_clip=trainer.grad_clip,
        micro_batch_size=trainer.micro_batch_size, logprob_chunk=trainer.logprob_chunk, param_dtype=trainer.param_dtype,
        fsdp_wrap=trainer.fsdp_wrap, gradient_checkpointing=trainer.gradient_checkpointing, compile=trainer.compile,
        activation_memory_budget=trainer.activation_memory_budget,
        loss=algo.name, loss_cfg=LossConfig(clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high,
                                            kl_estimator=algo.kl_estimator, opsm_delta=algo.opsm_delta,
                                            aggregation=algo.aggregation),
        keep_routing=algo.keep_routing, keep_sampling_mask=algo.keep_sampling_mask, require_routing=want.routing,
        require_sampling_mask=want.sampling_mask, temperature=cfg.rollout.temperature, kl_coefs=kl_coefs,
        seed=trainer.seed, dsa_loss=algo.dsa_loss, dsa_loss_coef=algo.dsa_loss_coef)


def learner(cfg: Config, model: str, kl_coefs: dict[str, float]):
    """The learner ranks (Ray actors, FSDP2, in a placement group) for `model`. On an attached cluster the run
    dir must be storage every node sees (checked first: rl.cluster.check_shared_dir)."""
    from rl.cluster import check_shared_dir
    from rl.learner import LearnerGroup

    trainer = cfg.trainer
    if cfg.cluster.address is not None:
        check_shared_dir(trainer.run_dir, "trainer.run_dir")
    return LearnerGroup(learner_config(cfg, model, kl_coefs), trainer.world_size, num_cpus=trainer.learner_cpus,
                        num_gpus=trainer.learner_gpus or 0, resources=dict(trainer.learner_resources), placement=trainer.placement)


def weight_sync(cfg: Config, learner, engines, run_dir: Path):
    """The `trainer.weight_sync` transport from this learner to these engines (a `rollout.weight_transfer.
    WeightSync`), built at the first sync and kept on the engines' manager; 'auto' is resolved from where the
    actors landed (`weight_transport`) and the choice is printed."""
    from rollout.weight_transfer import SyncSpec, WeightSync

    if engines.weight_sync is None or engines.weight_sync.learner is not learner:
        transport, why = weight_transport(cfg, learner, engines)
        if cfg.trainer.weight_sync == "auto":
            print(f"auto settings: trainer.weight_sync={transport} ({why})", flush=True)
        spec = SyncSpec(transport, cfg.trainer.sync_bucket_mb, engines.cfg.dtype)
        engines.weight_sync = WeightSync(learner, engines, spec, str(run_dir / "weights_sync"))
    return engines.weight_sync


def weight_transport(cfg: Config, learner, engines) -> tuple[str, str]:
    """(transport, why) for `trainer.weight_sync` between this learner and these engines (`choose_transport`)."""
    import ray

    def where():
        return learner.placement(), ray.get([e.placement.remote() for e in engines.engines])

    return choose_transport(cfg, is_moe_checkpoint(engines.cfg.model), where)


def choose_transport(cfg: Config, moe: bool, where) -> tuple[str, str]:
    """'auto' -> a tensor transport wherever one works, the checkpoint otherwise. `where()` gives the learner
    rank 0's and each engine's (Ray node id, GPU ids), asked only for GPU engines: IPC needs every engine on
    the learner's GPU, NCCL needs every engine on another GPU (NCCL refuses two ranks on one GPU)."""
    rollout, trainer = cfg.rollout, cfg.trainer
    if trainer.weight_sync != "auto":
        return trainer.weight_sync, "configured"
    if not rollout.engine_gpus:
        if rollout.engine == "vllm" and moe:
            return "checkpoint", "vLLM on CPU reloads MoE weights only by restarting from a checkpoint"
        return "object_store", "engines on CPU"
    if rollout.engine != "vllm" or not trainer.learner_gpus or rollout.tensor_parallel_size > 1:
        return "checkpoint", "no tensor transport for this placement (GPU engines other than single-GPU vLLM, or a CPU learner)"
    mine, theirs = where()
    shared = [p == mine for p in theirs]
    if all(shared):
        return "ipc", "engines on the learner's GPU"
    if not any(shared):
        return "nccl", "engines on other GPUs"
    return "checkpoint", "some engines share the learner's GPU and some do not"


def actors(cfg: Config, model: str, kl_coefs: dict[str, float]):
    """(learner, engines), started side by side where they hold whole devices: the learner's load and the
    engines' start (vLLM's compile and CUDA graphs) are each tens of seconds on GPU, and neither needs the
    other. Sharing a GPU (a fraction of one each) they start one after the other: vLLM sizes its KV cache
    from the GPU's memory use while it starts, which a learner loading at the same time would change.
    Either one failing kills the other's actors."""
    from concurrent.futures import ThreadPoolExecutor

    if any(0 < (g or 0) < 1 for g in (cfg.rollout.engine_gpus, cfg.trainer.learner_gpus)):
        ranks = learner(cfg, model, kl_coefs)
        try:
            return ranks, engines(cfg, model)
        except BaseException:
            ranks.kill()
            raise
    with ThreadPoolExecutor(2) as pool:
        started = pool.submit(learner, cfg, model, kl_coefs), pool.submit(engines, cfg, model)
        try:
            return started[0].result(), started[1].result()
        except BaseException:
            for future, stop in zip(started, ("kill", "shutdown")):
                if not future.exception():
                    getattr(future.result(), stop)()
            raise


def scoring_pool(cfg: Config):
    from rewards.pool import ScoringPool

    return ScoringPool(timeout_s=cfg.trainer.scoring_timeout_s)


def sampling(rollout: RolloutConfig, seed: int | None, n: int | None = None) -> SamplingConfig:
    """Training sampling settings of `rollout.*` (n samples per prompt)."""
    return SamplingConfig(n=rollout.n if n is None else n, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                          max_tokens=rollout.max_tokens, seed=seed)


@dataclass
class Setup:
    """What the config resolves to before anything starts: paths, tokenizer, data, scorers."""

    cfg: Config
    dir: Path
    model_path: str
    tok: object
    specs: dict
    train_prompts: list
    eval_prompts: list
    pool: object
    kl_coefs: dict
    agent: object

    @property
    def ckpt(self) -> Path:
        return self.dir / "checkpoints" / "latest"


def setup(cfg: Config, for_eval: bool = False) -> Setup:
    from transformers import AutoTokenizer

    from rewards import parse_specs
    from rollout.tiny_models import build_tiny_model

    # Absolute: actors on other nodes do not share the driver's working directory.
    run_dir = Path(cfg.trainer.run_dir).resolve()
    model_path = str(Path(cfg.model.path).resolve()) if cfg.model.path else str(run_dir / "model_init")
    if cfg.model.tiny and not (Path(model_path) / "config.json").is_file():
        build_tiny_model(cfg.model.tiny, model_path, seed=cfg.model.seed, dsa_top_k=cfg.model.dsa_top_k,
                         **cfg.model.tiny_overrides)
    tok = AutoTokenizer.from_pretrained(model_path)
    specs = parse_specs(cfg.rewards)
    room = cfg.rollout.max_model_len - cfg.rollout.max_tokens

    def load(path: str, which: str):
        from rl.data import load_prompts

        return load_prompts(path, tok, specs, room, cfg.data.skip_bad_rows, cfg.data.system_prompt,
                            data_cfg=cfg.data, which=which, template_args=cfg.agent.template_args)

    train = [] if for_eval else load(cfg.data.train, "train")[0]
    evals = load(cfg.data.eval, "eval")[0][: cfg.eval.max_prompts] if cfg.data.eval else []
    return Setup(cfg, run_dir, model_path, tok, specs, train, evals, scoring_pool(cfg),
                 domain_betas(cfg, specs), agent_runner(cfg, tok))
