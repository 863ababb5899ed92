"""The config schema (frozen dataclasses; YAML only composes) and its loading.

`load_config(overrides)` composes `configs/config.yaml` with Hydra's compose API and the user's overrides
(`algo.kl_coef=0.01 rollout.n=8 model=tiny_moe`), merges it into the schema (unknown keys and wrong types
fail with the key path), then checks ranges. All of it runs before Ray or any model starts.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    path: Optional[str] = None  # a local HF checkpoint directory
    tiny: Optional[str] = None  # or build a tiny random model of this kind ('dense' | 'moe') in the run dir
    tiny_overrides: dict = field(default_factory=dict)  # HF config fields for the tiny model
    dsa_top_k: Optional[int] = None  # tiny model with DeepSeek Sparse Attention (reference engine only)
    seed: int = 0


@dataclass(frozen=True)
class AlgoConfig:
    name: str = "grpo"  # the policy loss (rl.algos.POLICY_LOSSES)
    advantage: str = "grpo"  # rl.algos.ADVANTAGES: grpo (V3.2, no std) | grpo_std
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # DAPO clip-higher; None = clip_eps
    kl_coef: float = 0.0  # beta for every domain without its own entry in kl_coef_per_domain
    kl_coef_per_domain: dict = field(default_factory=dict)  # domain -> beta (V3.2: 0 for math)
    kl_estimator: str = "unbiased_k3"
    opsm_delta: Optional[float] = None  # off-policy sequence masking threshold; None = off
    aggregation: str = "seq_mean_token_mean"
    keep_routing: bool = True
    keep_sampling_mask: bool = True
    dsa_loss: Optional[str] = None  # DSA models: 'sparse' trains the indexer next to the policy (rl.dsa)
    dsa_loss_coef: float = 1.0


@dataclass(frozen=True)
class RolloutConfig:
    # 'auto' settings are resolved once by `resolve_auto` (GPUs visible to the driver: vLLM in bf16 with
    # CUDA graphs; none: the reference engine, exact captures on CPU) and the choice is printed.
    engine: str = "auto"  # vllm | reference | auto
    num_engines: int = 1
    n: int = 8  # samples per prompt (group size)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    max_model_len: int = 1024
    chunk_prompts: int | None = None  # prompts per engine call; None: each engine gets its share of the step at once
    dtype: str = "auto"  # engine weights: float32 | bfloat16 | float16 | auto (bf16 on GPU, fp32 on CPU)
    gpu_memory_utilization: Optional[float] = None  # vLLM's share of its GPU; None: 0.85 alone, 0.4 shared
    enforce_eager: Optional[bool] = None  # vLLM without CUDA graphs; None: eager on CPU, graphs on GPU
    tensor_parallel_size: int = 1  # vLLM tensor parallelism (needs that many GPUs per engine)
    extra: dict = field(default_factory=dict)  # more vllm.LLM keyword arguments, passed as they are
    engine_cpus: float = 1.0
    engine_gpus: Optional[float] = None  # GPUs per engine actor; None: 1 on a GPU machine (0.5 with one GPU), else 0
    engine_resources: dict = field(default_factory=dict)  # custom Ray resources per engine, e.g. {node_b: 0.1} (pins engines)


@dataclass(frozen=True)
class DataConfig:
    """Prompt data (rl.data). `train` / `eval` take what `datasets.load_dataset` takes: a hub dataset name or
    a local folder of data files (with `split` / `subset`), a JSONL / JSON / Parquet / CSV file or glob, or a
    directory saved with `Dataset.save_to_disk`."""

    train: str = MISSING  # training prompts: a dataset name, data file(s) or a saved dataset directory
    eval: Optional[str] = None  # evaluation prompts, the same kinds of source
    split: str = "train"  # split of `train` when it is a dataset name, folder or saved DatasetDict
    eval_split: str = "test"  # split of `eval` (a single file is its own split: this is then ignored)
    subset: Optional[str] = None  # dataset configuration (load_dataset's `name`), e.g. 'main' for gsm8k
    prompt_key: str = "prompt"  # column holding the prompt (a string or a list of chat messages)
    answer_key: Optional[str] = None  # column to use as the scorers' `answer` (e.g. 'solution'); None: 'answer'
    columns: dict = field(default_factory=dict)  # more renames, source column -> row field (Dataset.rename_columns)
    domain: Optional[str] = None  # domain (a key of rewards:) of rows without a `domain` column or value
    num_proc: Optional[int] = None  # processes for tokenising (Dataset.map); None: in this process
    prompts_per_step: int = 16  # prompts per training step (each gets rollout.n samples)
    shuffle_seed: int = 0  # seed of the per-epoch prompt order
    skip_bad_rows: bool = False  # False: stop at the first malformed row; True: skip them (counted, logged once)
    system_prompt: Optional[str] = None  # system turn added to prompts that have none


@dataclass(frozen=True)
class DistillConfig:
    enabled: bool = False
    # domain -> 'rule', a checkpoint path, or 'data:<source>' (the user's demonstrations: a file, glob, saved
    # dir or dataset name as data.train takes, prompts in data.prompt_key, responses in response_key)
    specialists: dict = field(default_factory=dict)
    response_key: str = "response"  # 'data:' specialists: the column holding each prompt's demonstrated response
    samples_per_prompt: int = 1
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    dsa_warmup_steps: int = 0  # DSA: dense warm-up steps (indexer only) before SFT
    dsa_warmup_lr: float = 1e-3


@dataclass(frozen=True)
class AgentConfig:
    """Tool-use episodes (rollout.agent) for the prompts of `domains`."""

    domains: list = field(default_factory=list)  # data domains whose prompts run as tool-use episodes
    docs: Optional[str] = None  # document root of the search / read_file tools
    max_turns: int = 4  # model turns per episode
    max_context: Optional[int] = None  # context budget in tokens; None = rollout.max_model_len
    context_trigger: float = 0.8  # context management fires at this fraction of max_context
    context_strategy: str = "none"  # none | summary | discard_75 | discard_all | parallel_fewest_steps
    parallel: int = 4  # parallel_fewest_steps: candidates per episode
    summary_tokens: int = 64
    tool_context: dict = field(default_factory=dict)  # tool -> fixed arguments, e.g. {python: {timeout_s: 5}}
    template_args: dict = field(default_factory=dict)  # chat-template arguments for prompts and episodes, e.g. {enable_thinking: false}


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = 10
    lr: float = 1e-5
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 16
    logprob_chunk: int = 1024  # positions per chunk of the log-prob head (~1.2-1.6 GB of temporaries at a 152k vocabulary)
    param_dtype: str = "auto"  # float32 | bfloat16 (FSDP2 mixed precision, fp32 master weights) | auto
    # FSDP2 units, where FSDP2 is used (world_size > 1 or bfloat16; one float32 rank has none): layer (each decoder
    # layer: least memory) | model (one unit: one gather and one reduction a micro-batch instead of one per layer
    # with their hooks, for the whole model unsharded on every rank: several bytes a parameter more). On one H200,
    # model was 1.29x faster on a compiled 0.4B step for +0.7 GB (bench/README.md): pick it at world 1 when it fits
    fsdp_wrap: str = "layer"
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (less activation memory)
    compile: bool = False  # torch.compile each decoder layer and the log-prob head's softmax passes
    # Under compile: the share of activations backward keeps; below 1 the compiled backward recomputes the cheapest ops
    # (norms, activations) instead (no extra host calls, unlike gradient_checkpointing). 1.0: save all it needs
    activation_memory_budget: float = 1.0
    world_size: int = 1  # learner ranks (processes)
    learner_cpus: float = 1.0
    learner_gpus: Optional[float] = None  # GPUs per learner rank; None: 1 on a GPU machine (0.5 with one GPU), else 0
    learner_resources: dict = field(default_factory=dict)  # custom Ray resources per rank, e.g. {node_a: 0.1} (pins ranks)
    placement: str = "pack"  # learner ranks' placement group: pack (fewest nodes) | spread (most nodes)
    # Learner -> engines after every step (rollout.weight_transfer): auto | nccl | ipc | object_store | checkpoint.
    # auto: CUDA IPC when the engines share the learner's GPU, NCCL when they are on other GPUs or nodes, Ray's
    # object store when they run on CPU, the checkpoint (a HF export in the run dir) where none of these works.
    weight_sync: str = "auto"
    sync_bucket_mb: int = 256  # weights travel in buckets of about this size (one gather + send each)
    mode: str = "sync"  # sync | async (rollouts for step k+1 run while step k trains)
    max_staleness: int = 1  # async: batches are collected up to this many policy versions ahead (older samples dropped)
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 10  # checkpoint every this many steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2  # numbered checkpoints kept (checkpoints/step_N; 'latest' points to the newest)
    async_checkpoint: bool = True  # periodic checkpoints write in the background (sharded, torch.distributed.checkpoint)
    allow_config_change: bool = False  # resume although the config differs from the run dir's config.yaml
    max_nonfinite_steps: int = 3  # stop after this many steps with a NaN/inf loss or reward
    max_failure_rate: float = 0.5  # stop when more than this fraction of a step's samples failed
    scoring_timeout_s: float = 30.0  # per reward function call; a call past it abstains (None) and is counted
    run_dir: str = "runs/default"
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    k: int = 4  # samples per prompt for pass@k / maj@k
    max_prompts: int = 64
    temperature: float = 1.0


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "offline"  # offline | online (online needs WANDB_API_KEY) | disabled
    project: str = "v32rl"
    run_name: Optional[str] = None  # W&B run name; None: the run dir's name
    group: Optional[str] = None  # W&B group (runs compared together)
    tags: list = field(default_factory=list)  # W&B tags
    plots: bool = True
    progress: bool = True  # tqdm bars (generation, distillation, evaluation) and a line per step


@dataclass(frozen=True)
class ClusterConfig:
    address: Optional[str] = None  # None: start Ray in-process; 'auto' or host:port: attach
    num_cpus: Optional[int] = None
    host: str = "127.0.0.1"  # where a Ray head started by launch/ binds


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: Any = MISSING  # domain -> reward spec (rewards.spec); validated by rewards.parse_specs
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


class ConfigError(ValueError):
    """A config problem; the message starts with the key path."""


def compose(overrides: list[str] | None = None, config_name: str = "config", config_dir: str | None = None):
    """Hydra composition of `<config_name>.yaml` with overrides (no schema yet). `config_dir` (the user's
    `--config-dir`) is searched first, then `configs/`: `rewards=mine` finds DIR/rewards/mine.yaml, and a
    file there shadows ours of the same name."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    # Dotted overrides become "++key=value" (set or add): every schema field can be overridden whether or
    # not a YAML file mentions it; a key that is not in the schema still fails in `to_schema`.
    overrides = [o if o[0] in "+~" or "." not in o.split("=", 1)[0] else "++" + o for o in overrides or []]
    try:
        with _search_path(config_dir):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as exc:
        raise ConfigError(f"config: {exc}") from None


@contextlib.contextmanager
def _search_path(config_dir: str | None):
    """Hydra initialised on `config_dir` (first) and `configs/`. Hydra's public API cannot put a folder
    before the primary one (`hydra.searchpath` appends, and the primary config is looked up before it is
    read), so the search path is built with hydra._internal (hydra-core is pinned in constraints.txt)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    path = create_config_search_path(str(CONFIG_DIR))
    if config_dir is not None:
        if not Path(config_dir).is_dir():
            raise ConfigError(f"--config-dir: '{config_dir}' is not a directory")
        path.prepend("config-dir", f"file://{Path(config_dir).resolve()}", anchor=SearchPathQuery(provider="main"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2("v32rl", path)
    try:
        yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().clear()


def config_options(config_dir: str | None = None) -> dict[str, list[str]]:
    """The primary configs ('--config-name') and each group's options, `config_dir`'s included."""
    with _search_path(config_dir) as loader:
        out = {"--config-name": [n for n in loader.get_group_options("") if not n.startswith("_")]}
        for group in loader.list_groups(""):
            if group != "hydra":
                out[group] = loader.get_group_options(group)
    return out


class _OverridesAnywhere(argparse.ArgumentParser):
    """Options between overrides (`a=1 --config-dir X b=2`): plain argparse stops the overrides at the first
    option and refuses the rest ("unrecognized arguments")."""

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def cli_parser(description: str, argv: list[str] | None = None):
    """The command line shared by `rl.train` and `rl.eval`: --config-dir, --config-name, --cfg job and the
    overrides; --help also lists the config groups and their options (with the --config-dir's)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    epilog = None
    if "-h" in argv or "--help" in argv:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config-dir")
        options = config_options(pre.parse_known_args(argv)[0].config_dir)
        epilog = "primary configs (--config-name NAME) and config groups (group=option):\n" + "\n".join(
            f"  {group:14s} {', '.join(names)}" for group, names in options.items())
    p = _OverridesAnywhere(description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", help="your folder of configs, searched before configs/ (e.g. DIR/rewards/mine.yaml for rewards=mine)")
    p.add_argument("--config-name", default="config", help="the primary config (default: config)")
    p.add_argument("--cfg", choices=["job"], help="print the composed, validated config as YAML and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo.kl_coef=0.01 rollout.n=8 rewards=mine")
    return p


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `--cfg job` prints and the run dir's config.yaml holds)."""
    from dataclasses import asdict

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))


def to_schema(raw, validated: bool = True) -> Config:
    """Merge a composed config into the schema: unknown keys, wrong types and missing fields fail here."""
    try:
        schema = OmegaConf.structured(Config)
        _writable(schema)  # frozen dataclasses become read-only nodes; the merge must write into them
        merged = OmegaConf.merge(schema, raw)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: Missing mandatory value" + (f" (also {missing[1:]})" if missing[1:] else ""))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    if validated:
        validate(cfg)
    return cfg


def _writable(node) -> None:
    from omegaconf import DictConfig

    OmegaConf.set_readonly(node, False)
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                _writable(child)


def load_config(overrides: list[str] | None = None, config_name: str = "config", gpus: int | None = None,
                config_dir: str | None = None) -> Config:
    """Compose (`config_dir` first, then configs/), merge into the schema, resolve 'auto' settings for this
    machine (`gpus`: CUDA devices the driver sees, counted when None) and validate. The resolved choices
    are in `AUTO_NOTES`."""
    raw = compose(overrides, config_name, config_dir)
    cfg = to_schema(raw, validated=False)
    cfg, notes = resolve_auto(cfg, _visible_gpus() if gpus is None else gpus)
    AUTO_NOTES[:] = notes
    validate(cfg)
    return cfg


AUTO_NOTES: list[str] = []  # what the last load_config chose for the 'auto' settings (the driver prints it)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def resolve_auto(cfg: Config, gpus: int) -> tuple[Config, list[str]]:
    """Replace 'auto'/None settings by what this machine supports. With GPUs: vLLM, one GPU per engine and
    per learner rank (half a GPU each with a single GPU), bf16, CUDA graphs. Without: the reference engine
    (vLLM on CPU cannot capture routed experts or sampling masks at a real vocabulary), fp32, eager."""
    from dataclasses import replace

    rollout, trainer, notes = cfg.rollout, cfg.trainer, []

    def pick(obj, key, value, why):
        notes.append(f"{key}={value} ({why})")
        return replace(obj, **{key.split(".")[-1]: value})

    where = f"{gpus} GPU{'s' if gpus != 1 else ''} visible" if gpus else "no GPU visible"
    share = 0.5 if gpus == 1 else 1.0
    if rollout.engine == "auto":
        rollout = pick(rollout, "rollout.engine", "vllm" if gpus else "reference", where)
    on_gpu = bool(gpus) and rollout.engine == "vllm"
    if rollout.engine_gpus is None:
        rollout = pick(rollout, "rollout.engine_gpus", share if on_gpu else 0.0, where)
    if trainer.learner_gpus is None:
        trainer = pick(trainer, "trainer.learner_gpus", share if gpus else 0.0, where)
    if rollout.dtype == "auto":
        rollout = pick(rollout, "rollout.dtype", "bfloat16" if rollout.engine_gpus else "float32",
                       "engine on GPU" if rollout.engine_gpus else "engine on CPU")
    if trainer.param_dtype == "auto":
        trainer = pick(trainer, "trainer.param_dtype", "bfloat16" if trainer.learner_gpus else "float32",
                       "learner on GPU" if trainer.learner_gpus else "learner on CPU")
    if rollout.enforce_eager is None:
        rollout = pick(rollout, "rollout.enforce_eager", not rollout.engine_gpus, "CUDA graphs on GPU" if rollout.engine_gpus else "CPU")
    if rollout.gpu_memory_utilization is None:
        shared = bool(rollout.engine_gpus) and rollout.engine_gpus < 1
        rollout = pick(rollout, "rollout.gpu_memory_utilization", 0.4 if shared else 0.85,
                       "GPU shared with the learner" if shared else "own GPU")
    return replace(cfg, rollout=rollout, trainer=trainer), notes


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Range and consistency checks with key paths (types were checked by the schema)."""
    import rollout.reference_engine  # noqa: F401  (register the engines; vLLM itself is imported lazily)
    import rollout.vllm_engine  # noqa: F401
    from rewards import SpecError, parse_specs
    from rl import algos
    from rollout.engine import ENGINES

    algo, rollout, trainer, data = cfg.algo, cfg.rollout, cfg.trainer, cfg.data
    _check((cfg.model.path is None) != (cfg.model.tiny is None), "model", "set exactly one of model.path and model.tiny")
    _check(cfg.model.tiny in (None, "dense", "moe"), "model.tiny", f"must be 'dense' or 'moe', got {cfg.model.tiny!r}")
    if cfg.model.path is not None:
        _check((Path(cfg.model.path) / "config.json").is_file(), "model.path", f"'{cfg.model.path}' is not a HF checkpoint directory")
    _check(algo.name in algos.POLICY_LOSSES, "algo.name", f"unsupported {algo.name!r}. Supported: {algos.POLICY_LOSSES.names()}")
    _check(algo.advantage in algos.ADVANTAGES, "algo.advantage", f"unsupported {algo.advantage!r}. Supported: {algos.ADVANTAGES.names()}")
    _check(algo.kl_estimator in algos.KL_ESTIMATORS, "algo.kl_estimator",
           f"unsupported {algo.kl_estimator!r}. Supported: {algos.KL_ESTIMATORS.names()}")
    _check(algo.aggregation in algos.AGGREGATIONS, "algo.aggregation",
           f"unsupported {algo.aggregation!r}. Supported: {algos.AGGREGATIONS.names()}")
    _check(0 < algo.clip_eps < 1, "algo.clip_eps", f"must be in (0, 1), got {algo.clip_eps}")
    _check(algo.clip_eps_high is None or algo.clip_eps_high > 0, "algo.clip_eps_high", f"must be > 0, got {algo.clip_eps_high}")
    _check(algo.kl_coef >= 0, "algo.kl_coef", f"must be >= 0, got {algo.kl_coef}")
    for dom, beta in algo.kl_coef_per_domain.items():
        _check(isinstance(beta, (int, float)) and beta >= 0, f"algo.kl_coef_per_domain.{dom}", f"must be a number >= 0, got {beta!r}")
    _check(algo.opsm_delta is None or algo.opsm_delta >= 0, "algo.opsm_delta", f"must be >= 0, got {algo.opsm_delta}")
    _check(rollout.engine in ENGINES or rollout.engine == "auto", "rollout.engine",
           f"unsupported {rollout.engine!r}. Supported: {[*ENGINES.names(), 'auto']}")
    _check(rollout.n >= (2 if algo.name == "grpo" else 1), "rollout.n", f"GRPO needs a group of at least 2 samples, got {rollout.n}")
    # Greedy samples have no sampling probability: the ratio pi_theta / pi_old is undefined (eval.temperature
    # may be 0: evaluation trains nothing).
    _check(rollout.temperature > 0, "rollout.temperature",
           f"must be > 0 for training (greedy samples have no pi_old), got {rollout.temperature}")
    _check(0 < rollout.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {rollout.top_p}")
    _check(rollout.top_k >= 0, "rollout.top_k", f"must be >= 0 (0 = off), got {rollout.top_k}")
    _check(rollout.dtype in ("auto", "float32", "bfloat16", "float16"), "rollout.dtype",
           f"auto | float32 | bfloat16 | float16, got {rollout.dtype!r}")
    _check(trainer.param_dtype in ("auto", "float32", "bfloat16"), "trainer.param_dtype",
           f"auto | float32 | bfloat16, got {trainer.param_dtype!r}")
    _check(trainer.fsdp_wrap in ("layer", "model"), "trainer.fsdp_wrap", f"layer | model, got {trainer.fsdp_wrap!r}")
    _check(0 < trainer.activation_memory_budget <= 1, "trainer.activation_memory_budget",
           f"must be in (0, 1], got {trainer.activation_memory_budget}")
    _check(trainer.compile or trainer.activation_memory_budget == 1, "trainer.activation_memory_budget",
           f"{trainer.activation_memory_budget} acts through torch.compile's partitioner: set trainer.compile=true, "
           "or use trainer.gradient_checkpointing=true without compile")
    _check(rollout.gpu_memory_utilization is None or 0 < rollout.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
           f"must be in (0, 1], got {rollout.gpu_memory_utilization}")
    _check(rollout.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", f"must be >= 1, got {rollout.tensor_parallel_size}")
    if rollout.engine_gpus is not None and rollout.engine == "vllm" and rollout.engine_gpus > 0:
        _check(rollout.tensor_parallel_size <= max(rollout.engine_gpus, 1), "rollout.tensor_parallel_size",
               f"{rollout.tensor_parallel_size} needs as many GPUs per engine (rollout.engine_gpus={rollout.engine_gpus})")
    validate_captures(cfg)
    validate_placement(cfg)
    _check(rollout.max_tokens >= 1 and rollout.num_engines >= 1, "rollout", "max_tokens and num_engines must be >= 1")
    _check(rollout.max_tokens < rollout.max_model_len, "rollout.max_tokens", f"{rollout.max_tokens} leaves no room for a prompt "
           f"in rollout.max_model_len={rollout.max_model_len}: raise max_model_len or lower max_tokens")
    _check(rollout.chunk_prompts is None or rollout.chunk_prompts >= 1, "rollout.chunk_prompts",
           f"must be >= 1 or null (each engine's share at once), got {rollout.chunk_prompts}")
    _check((rollout.engine_gpus or 0) >= 0 and (trainer.learner_gpus or 0) >= 0, "rollout.engine_gpus",
           "GPU counts (and trainer.learner_gpus) must be >= 0")
    _check(trainer.steps >= 0 and trainer.lr > 0 and trainer.world_size >= 1 and trainer.micro_batch_size >= 1, "trainer",
           "steps >= 0, lr > 0, world_size >= 1 and micro_batch_size >= 1 are required")
    _check(trainer.mode in ("sync", "async"), "trainer.mode", f"must be 'sync' or 'async', got {trainer.mode!r}")
    _check(trainer.max_staleness >= (1 if trainer.mode == "async" else 0), "trainer.max_staleness",
           f"must be >= 1 in async mode (how many steps collection runs ahead), >= 0 otherwise; got {trainer.max_staleness}")
    _check(trainer.save_every >= 0, "trainer.save_every", f"must be >= 0 (0 = only at the end), got {trainer.save_every}")
    _check(trainer.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"must be >= 1, got {trainer.keep_checkpoints}")
    _check(math.isfinite(trainer.lr), "trainer.lr", "must be finite")
    _check(data.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
    _check(data.num_proc is None or data.num_proc >= 1, "data.num_proc", f"must be >= 1, got {data.num_proc}")
    if cfg.model.dsa_top_k is not None:
        _check(cfg.model.dsa_top_k >= 1, "model.dsa_top_k", f"must be >= 1, got {cfg.model.dsa_top_k}")
        _check(rollout.engine == "reference", "rollout.engine", "DSA models run on the reference engine (vLLM has no DSA for them)")
    from rl.dsa import DSA_LOSSES

    _check(algo.dsa_loss is None or algo.dsa_loss in DSA_LOSSES, "algo.dsa_loss",
           f"unsupported {algo.dsa_loss!r}. Supported: {DSA_LOSSES.names()}")
    _check(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", "offline | online | disabled")
    try:
        specs = parse_specs(cfg.rewards or {}, where="rewards")
    except SpecError as exc:
        raise ConfigError(str(exc)) from None
    _check(bool(specs), "rewards", "at least one domain's reward spec is required")
    _check(data.domain is None or data.domain in specs, "data.domain",
           f"domain {data.domain!r} has no reward spec (rewards: {sorted(specs)})")
    validate_agent(cfg, specs)
    validate_specialists(cfg, specs)


def validate_specialists(cfg: Config, specs: dict) -> None:
    """A specialist is 'rule', 'data:<source>' or a HF checkpoint; the first and last are scored with the
    domain's reward spec, so their domain needs one (demonstrations are taken as they are)."""
    for dom, spec in cfg.distill.specialists.items():
        key = f"distill.specialists.{dom}"
        _check(isinstance(spec, str) and bool(spec), key, f"must be 'rule', 'data:<source>' or a checkpoint path, got {spec!r}")
        if spec.startswith("data:"):
            _check(bool(spec[5:].strip()), key, "'data:' needs a source, e.g. data:demos.jsonl or data:my_org/my_dataset")
            continue
        _check(dom in specs, key, f"domain {dom!r} has no reward spec to filter the specialist's outputs (rewards: {sorted(specs)})")
        _check(spec == "rule" or (Path(spec) / "config.json").is_file(), key,
               f"'{spec}' is neither 'rule', 'data:<source>' nor a HF checkpoint directory")


def model_is_moe(cfg: Config) -> bool:
    """Whether the configured model routes tokens to experts (the tiny 'moe' kind, or a checkpoint whose
    config.json names experts)."""
    if cfg.model.tiny is not None:
        return cfg.model.tiny == "moe"
    from rollout.engine import is_moe_checkpoint

    return is_moe_checkpoint(cfg.model.path)


def validate_placement(cfg: Config) -> None:
    """Where the actors run and how weights reach the engines: a transport the config names must be able to
    work there ('auto' is resolved from where the actors land, in rl.components.weight_sync)."""
    from rollout.weight_transfer import TRANSPORTS

    rollout, trainer = cfg.rollout, cfg.trainer
    _check(trainer.placement in ("pack", "spread"), "trainer.placement", f"must be 'pack' or 'spread', got {trainer.placement!r}")
    for key, res in (("trainer.learner_resources", trainer.learner_resources), ("rollout.engine_resources", rollout.engine_resources)):
        for name, amount in res.items():
            _check(isinstance(amount, (int, float)) and amount >= 0, f"{key}.{name}", f"must be a number >= 0, got {amount!r}")
    _check(trainer.sync_bucket_mb >= 1, "trainer.sync_bucket_mb", f"must be >= 1, got {trainer.sync_bucket_mb}")
    ws = trainer.weight_sync
    _check(ws in TRANSPORTS, "trainer.weight_sync", f"unsupported {ws!r}. Supported: {list(TRANSPORTS)}")
    engine_on_gpu = None if rollout.engine_gpus is None else rollout.engine_gpus > 0
    if ws in ("ipc", "nccl"):
        _check(rollout.engine == "vllm", "trainer.weight_sync", f"{ws} loads into vLLM engines only (rollout.engine={rollout.engine!r}): "
               "use object_store or checkpoint")
        _check(engine_on_gpu is not False and trainer.learner_gpus != 0, "trainer.weight_sync",
               f"{ws} needs the learner and the engines on GPUs (trainer.learner_gpus, rollout.engine_gpus): use object_store")
        _check(rollout.tensor_parallel_size == 1, "trainer.weight_sync", f"{ws} does not cover tensor-parallel engines "
               f"(rollout.tensor_parallel_size={rollout.tensor_parallel_size}): use checkpoint")
    if ws == "object_store" and rollout.engine == "vllm":
        _check(engine_on_gpu is not True, "trainer.weight_sync", "object_store feeds vLLM's in-process CPU engine only; "
               "vLLM on GPU takes ipc or nccl")
        _check(not model_is_moe(cfg), "trainer.weight_sync", "vLLM on CPU reloads MoE weights only by restarting from a "
               "checkpoint (its in-place reload corrupts the fused experts): use checkpoint (or auto)")


def validate_captures(cfg: Config) -> None:
    """The corrections the config asks for must be deliverable by the chosen engine, or the run stops here.
    vLLM on CPU (rollout.engine_gpus=0) runs its CPU model runner, which cannot return routed experts; its
    sampling masks come from full-vocabulary processed log-probs, exact but only practical for small
    vocabularies (checked when the model's vocabulary is known)."""
    from rollout.engine import captures_needed

    rollout, algo = cfg.rollout, cfg.algo
    if rollout.engine != "vllm" or rollout.engine_gpus is None or rollout.engine_gpus > 0:
        return
    routing, mask = captures_needed(algo.keep_routing, algo.keep_sampling_mask, model_is_moe(cfg), rollout.top_k, rollout.top_p)
    _check(not routing, "algo.keep_routing", "vLLM on CPU (rollout.engine_gpus=0) cannot capture the routed experts this "
           "MoE model needs for keep routing; use rollout=reference (exact capture on CPU) or algo.keep_routing=false")
    if mask and cfg.model.path is not None:
        from rollout.engine import vocab_size_of

        V = vocab_size_of(cfg.model.path)
        _check(V <= CPU_MASK_MAX_VOCAB, "algo.keep_sampling_mask",
               f"vLLM on CPU records sampling masks from full-vocabulary log-probs, impractical at vocabulary {V} "
               f"(> {CPU_MASK_MAX_VOCAB}); use rollout=reference, a GPU engine, or algo.keep_sampling_mask=false")


CPU_MASK_MAX_VOCAB = 32_768


def validate_agent(cfg: Config, specs: dict) -> None:
    from rollout.agent import CONTEXT_STRATEGIES, TOOLS

    agent = cfg.agent
    for dom in agent.domains:
        _check(dom in specs, "agent.domains", f"domain {dom!r} has no reward spec (rewards: {sorted(specs)})")
    _check(agent.context_strategy in CONTEXT_STRATEGIES, "agent.context_strategy",
           f"unsupported {agent.context_strategy!r}. Supported: {CONTEXT_STRATEGIES.names()}")
    _check(0 < agent.context_trigger <= 1, "agent.context_trigger", f"must be in (0, 1], got {agent.context_trigger}")
    _check(agent.max_turns >= 1 and agent.parallel >= 1 and agent.summary_tokens >= 8, "agent",
           "max_turns >= 1, parallel >= 1 and summary_tokens >= 8 are required")
    _check(agent.max_context is None or 0 < agent.max_context <= cfg.rollout.max_model_len, "agent.max_context",
           f"must be in (0, rollout.max_model_len={cfg.rollout.max_model_len}], got {agent.max_context}")
    _check(agent.docs is None or Path(agent.docs).is_dir(), "agent.docs", f"'{agent.docs}' is not a directory")
    for tool in agent.tool_context:
        _check(tool in TOOLS, f"agent.tool_context.{tool}", f"unknown tool. Registered: {TOOLS.names()}")


def agent_runner(cfg: Config, tokenizer):
    """The tool-use runner for `agent.domains` (None when there are none)."""
    from rollout.agent import AgentRunner, EpisodeConfig

    agent = cfg.agent
    if not agent.domains:
        return None
    tools = {"search": {"root": agent.docs}, "read_file": {"root": agent.docs}} if agent.docs else {}
    for tool, kw in agent.tool_context.items():
        tools[tool] = {**tools.get(tool, {}), **kw}
    ecfg = EpisodeConfig(max_turns=agent.max_turns, max_context=agent.max_context or cfg.rollout.max_model_len,
                         trigger=agent.context_trigger, strategy=agent.context_strategy, parallel=agent.parallel,
                         summary_tokens=agent.summary_tokens, tool_context=tools, template_args=dict(agent.template_args))
    return AgentRunner(tokenizer, ecfg, tuple(agent.domains))


def domain_betas(cfg: Config, domains) -> dict[str, float]:
    return {dom: float(cfg.algo.kl_coef_per_domain.get(dom, cfg.algo.kl_coef)) for dom in domains}
