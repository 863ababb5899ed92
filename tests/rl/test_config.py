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
        (["agent.context_strategy=forget"], r"^agent.context_strategy: unsupported 'forget'. Supported: \['none', 'parallel_fewest_steps', 'discard_75', 'discard_all', 'summary'\]"),
        (["agent.max_context=100000"], r"^agent.max_context: must be in \(0, rollout.max_model_len=512\]"),
        (["agent.tool_context={shell: {}}"], r"^agent.tool_context.shell: unknown tool"),
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
