"""Every config in configs/ composes and validates; bad configs fail fast with the key path."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import CONFIG_DIR, ConfigError, load_config

PRIMARY = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
GROUP_OPTIONS = sorted((g.name, p.stem) for g in CONFIG_DIR.iterdir() if g.is_dir() for p in g.glob("*.yaml"))


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_compose(name):
    cfg = load_config([], name)
    assert cfg.rewards and cfg.data.train


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option, tiny_dense):
    extra = [f"model.path={tiny_dense}"] if (group, option) == ("model", "local") else []
    if (group, option) == ("rollout", "vllm"):  # vLLM's CPU runner cannot capture the tiny MoE's routing
        extra = ["algo.keep_routing=false"]
    cfg = load_config([f"{group}={option}", *extra])
    assert cfg is not None


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.lrr=1"], r"^trainer.lrr: Key 'lrr' not in 'TrainerConfig'"),
        (["algo.clip_eps=abc"], r"^algo.clip_eps: Value 'abc' of type 'str' could not be converted to Float"),
        (["algo.clip_eps=0"], r"^algo.clip_eps: must be in \(0, 1\)"),
        (["rollout.n=1"], r"^rollout.n: GRPO needs a group of at least 2 samples"),
        (["algo.kl_coef=-0.1"], r"^algo.kl_coef: must be >= 0"),
        (["algo.kl_coef_per_domain={math: -1}"], r"^algo.kl_coef_per_domain.math: must be a number >= 0"),
        (["algo.kl_estimator=k4"], r"^algo.kl_estimator: unsupported 'k4'. Supported: \['k1', 'k2', 'k3', 'unbiased_k3'\]"),
        (["rewards.math.corect=1.0"], r"^rewards.math.corect: Unsupported scorer 'corect'"),
        (["data.train=null"], r"^data.train: Incompatible value 'None'"),
        (["model=local"], r"^model: set exactly one of model.path and model.tiny"),
        (["rollout.engine=sglang"], r"^rollout.engine: unsupported 'sglang'"),
        (["model.path=/nonexistent", "model.tiny=null"], r"^model.path: '/nonexistent' is not a HF checkpoint directory"),
        (["agent.domains=[poetry]"], r"^agent.domains: domain 'poetry' has no reward spec"),
        (["agent.context_strategy=forget"], r"^agent.context_strategy: unsupported 'forget'. Supported: \['discard_75', 'discard_all', 'none', 'parallel_fewest_steps', 'summary'\]"),  # noqa: E501
        (["agent.max_context=100000"], r"^agent.max_context: must be in \(0, rollout.max_model_len=512\]"),
        (["agent.tool_context={shell: {}}"], r"^agent.tool_context.shell: unknown tool"),
        (["rollout.temperature=0"], r"^rollout.temperature: must be > 0 for training"),
        (["rollout.max_tokens=512"], r"^rollout.max_tokens: 512 leaves no room for a prompt in rollout.max_model_len=512"),
        (["data.num_proc=0"], r"^data.num_proc: must be >= 1"),
        (["data.domain=poetry"], r"^data.domain: domain 'poetry' has no reward spec"),
        (["rollout.top_k=-1"], r"^rollout.top_k: must be >= 0"),
        (["rollout.gpu_memory_utilization=1.5"], r"^rollout.gpu_memory_utilization: must be in \(0, 1\]"),
        (["trainer.param_dtype=fp8"], r"^trainer.param_dtype: auto \| float32 \| bfloat16"),
        (["trainer.save_every=-1"], r"^trainer.save_every: must be >= 0 \(0 = only at the end\)"),
        (["trainer.keep_checkpoints=0"], r"^trainer.keep_checkpoints: must be >= 1"),
        (["trainer.activation_memory_budget=0"], r"^trainer.activation_memory_budget: must be in \(0, 1\]"),
        (["trainer.activation_memory_budget=0.5"], r"^trainer.activation_memory_budget: 0.5 acts through torch.compile's "
                                                   r"partitioner: set trainer.compile=true"),
        (["distill.specialists={math: /no/such/ckpt}"], r"^distill.specialists.math: '/no/such/ckpt' is neither 'rule', "
                                                        r"'data:<source>' nor a HF checkpoint directory"),
        (["rollout=vllm"], r"^algo.keep_routing: vLLM on CPU \(rollout.engine_gpus=0\) cannot capture the routed experts.*"
                           r"use rollout=reference \(exact capture on CPU\) or algo.keep_routing=false"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)
    assert time.monotonic() - t0 < 5


def test_cli_fails_fast_with_one_line():
    root = Path(__file__).resolve().parents[2]
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "rl.train", "algo.clip_eps=0"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "error: algo.clip_eps: must be in (0, 1), got 0.0"
    assert time.monotonic() - t0 < 30  # process start + imports; the check itself is the < 5 s above


def test_auto_settings_follow_the_machine():
    """The default config runs on a CPU machine (reference engine, fp32, eager) and on a GPU machine (vLLM,
    bf16, CUDA graphs, its own GPU per engine and learner), and says what it chose."""
    from rl.config import AUTO_NOTES

    cpu = load_config([], gpus=0)
    assert (cpu.rollout.engine, cpu.rollout.engine_gpus, cpu.trainer.learner_gpus) == ("reference", 0.0, 0.0)
    assert (cpu.rollout.dtype, cpu.trainer.param_dtype, cpu.rollout.enforce_eager) == ("float32", "float32", True)
    assert "rollout.engine=reference (no GPU visible)" in AUTO_NOTES
    gpu = load_config([], gpus=2)
    assert (gpu.rollout.engine, gpu.rollout.engine_gpus, gpu.trainer.learner_gpus) == ("vllm", 1.0, 1.0)
    assert (gpu.rollout.dtype, gpu.trainer.param_dtype, gpu.rollout.enforce_eager) == ("bfloat16", "bfloat16", False)
    assert gpu.rollout.gpu_memory_utilization == 0.85
    one = load_config([], gpus=1)
    assert (one.rollout.engine_gpus, one.trainer.learner_gpus, one.rollout.gpu_memory_utilization) == (0.5, 0.5, 0.4)
    explicit = load_config(["rollout=vllm", "rollout.engine_gpus=1", "rollout.dtype=float16"], gpus=1)
    assert (explicit.rollout.engine_gpus, explicit.rollout.dtype) == (1.0, "float16")  # the user's word wins


def test_corrections_decide_the_engine_captures(tiny_dense):
    from rl import components

    v32 = load_config(["rollout.top_p=0.95"], gpus=2)
    assert components.captures(v32) == components.Captures(routing=True, sampling_mask=True)
    ecfg = components.engine_config(v32.rollout, "m", want=components.captures(v32))
    assert ecfg.enable_return_routed_experts and ecfg.return_sampling_mask and ecfg.dtype == "bfloat16"
    lcfg = components.learner_config(v32, "m", {})
    assert lcfg.require_routing and lcfg.require_sampling_mask and lcfg.param_dtype == "bfloat16"
    assert components.captures(load_config([], gpus=2)).sampling_mask is False  # top_p = 1: nothing truncated
    dense = load_config([f"model.path={tiny_dense}", "model.tiny=null", "rollout.top_k=5"], gpus=2)
    assert components.captures(dense) == components.Captures(routing=False, sampling_mask=True)
    off = load_config(["rollout.top_p=0.9", "algo.keep_routing=false", "algo.keep_sampling_mask=false"], gpus=2)
    assert components.captures(off) == components.Captures(False, False)


def _user_configs(root: Path) -> Path:
    """A user's config folder outside the repo: a rewards option, a shadowed trainer default, a primary config."""
    (root / "rewards").mkdir(parents=True)
    (root / "rewards" / "mine.yaml").write_text("math: {correct: 1.0, format: 0.2}\nstring: {correct: {scorer: exact, weight: 1.0}}\n")
    (root / "trainer").mkdir()
    (root / "trainer" / "default.yaml").write_text("steps: 7\nlr: 2e-5\nrun_dir: runs/mine\n")
    (root / "exp.yaml").write_text("defaults:\n  - config\n  - override rewards: mine\n  - _self_\nalgo:\n  kl_coef: 0.05\n")
    return root


def test_config_dir_is_searched_before_ours(tmp_path):
    user = str(_user_configs(tmp_path / "my_configs"))
    with pytest.raises(ConfigError, match=r"^config: .*rewards/mine"):  # not in configs/: needs --config-dir
        load_config(["rewards=mine"])
    cfg = load_config(["rewards=mine"], config_dir=user)
    assert set(cfg.rewards["math"]) == {"correct", "format"}
    assert (cfg.trainer.steps, cfg.trainer.lr) == (7, 2e-5)  # the user's trainer/default.yaml shadows ours
    assert load_config([], config_dir=user).rollout.n == load_config([]).rollout.n  # the rest is ours
    exp = load_config([], "exp", config_dir=user)  # a primary config of the user's, on top of ours
    assert exp.algo.kl_coef == 0.05 and "format" in exp.rewards["math"]
    with pytest.raises(ConfigError, match=r"^--config-dir: '/no/such/dir' is not a directory"):
        load_config([], config_dir="/no/such/dir")


def test_cfg_job_prints_the_config_and_help_lists_the_groups(tmp_path, capsys):
    from omegaconf import OmegaConf

    from rl import eval as rl_eval
    from rl import train

    user = str(_user_configs(tmp_path / "my_configs"))
    run_dir = tmp_path / "run"
    assert train.main(["--config-dir", user, "rewards=mine", f"trainer.run_dir={run_dir}", "--cfg", "job"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.trainer.steps == 7 and printed.rewards.math.format == 0.2 and printed.rollout.engine != "auto"
    assert not run_dir.exists()  # printing the config starts nothing
    assert train.main(["--config-dir", user, "trainer.stepz=1", "--cfg", "job"]) == 2
    assert "error: trainer.stepz: Key 'stepz' not in 'TrainerConfig'" in capsys.readouterr().err
    assert rl_eval.main(["--config-dir", user, "--checkpoint", str(tmp_path), "--cfg", "job"]) == 2  # not a checkpoint

    for main in (train.main, rl_eval.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--config-dir", user, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "--config-dir" in out and "--cfg {job}" in out
        groups = {line.split()[0]: line.split(None, 1)[1] for line in out.split("group=option):\n")[1].splitlines()}
        assert groups["rewards"] == "agent, mine, synthetic" and "exp" in groups["--config-name"]
        assert groups["algo"] == "dapo, grpo, grpo_v32" and groups["model"] == "local, tiny_dense, tiny_moe"


def test_options_may_come_between_overrides():
    from rl.config import cli_parser

    a = cli_parser("x").parse_args(["--config-name", "quickstart", "a=1", "--config-dir", "/cfg", "b=2"])
    assert (a.config_name, a.config_dir, a.overrides) == ("quickstart", "/cfg", ["a=1", "b=2"])


@pytest.mark.parametrize("gpus", [0, 1])
def test_learner_bench_builds_through_the_config_path(gpus, tiny_dense):
    """bench/learner_vs_trl.py's `ours` variants are what `rl.train <overrides>` would build: their overrides load,
    validate, and reach the LearnerConfig."""
    import importlib.util

    from rl.components import learner_config

    path = Path(__file__).parents[2] / "bench" / "learner_vs_trl.py"
    spec = importlib.util.spec_from_file_location("learner_vs_trl", path)
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(path.parent))
    cfg = load_config(bench.ours_overrides("ours+gc+model+compile+mem0.4@256", 8, bool(gpus)), gpus=gpus)
    lc = learner_config(cfg, str(tiny_dense), kl_coefs={})
    assert (lc.micro_batch_size, lc.gradient_checkpointing, lc.compile, lc.activation_memory_budget, lc.fsdp_wrap,
            lc.logprob_chunk) == (8, True, True, 0.4, "model", 256)
    assert lc.param_dtype == ("bfloat16" if gpus else "float32") and not lc.keep_routing and not lc.keep_sampling_mask
