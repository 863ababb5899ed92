"""Progress and W&B as users expect: run name / group / tags from the config, the run URL when online, a
table of sampled completions at each evaluation (W&B offline here: no network), plots redrawn from
metrics.jsonl (a crashed run's too), progress bars that `logging.progress=false` turns off."""
from __future__ import annotations

import io
import json
import sys

import pytest

from rl import plots
from rl.config import load_config
from rl.tracking import Completions, Tracker
from rollout import progress
from rollout.sample import Sample, Status


def _sample(prompt, text, reward, domain="math"):
    return Sample(prompt_ids=[1], response_ids=[2], status=Status.COMPLETED, domain=domain, text=text,
                  metadata={"prompt": prompt, "answer": "4"}, rewards={"correct": reward, "format": 1.0}, reward=reward)


def test_wandb_name_group_tags_and_completions_table(tmp_path):
    cfg = load_config(["logging.wandb_mode=offline", "logging.run_name=exp-1", "logging.group=ablation",
                       "logging.tags=[v32,small]", f"trainer.run_dir={tmp_path}"])
    t = Tracker(str(tmp_path), cfg)
    assert (t.wandb.name, t.wandb.group, list(t.wandb.tags)) == ("exp-1", "ablation", ["v32", "small"])
    shown = Completions.of([_sample("What is 2+2?", "\\boxed{4}", 1.0),
                            _sample([{"role": "user", "content": "2+3?"}], "6", 0.0)])
    t.log(0, {"_kind": "eval", "eval/math/greedy_acc": 0.5, "eval/completions": shown})
    t.log(5, {"eval/math/greedy_acc": 0.75, "eval/completions": Completions.of([_sample("1+1?", "\\boxed{2}", 1.0)])})
    t.finish()

    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/math/greedy_acc"] for r in rows] == [0.5, 0.75] and all("eval/completions" not in r for r in rows)
    got = [json.loads(l) for l in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [(c["step"], c["prompt"], c["completion"], c["reward"], c["reward/correct"]) for c in got[:2]] == [
        (0, "What is 2+2?", "\\boxed{4}", 1.0, 1.0), (0, "user: 2+3?", "6", 0.0, 0.0)]
    tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/completions_*.table.json"))
    assert len(tables) == 2, "one W&B table per evaluation"
    first = [json.loads(p.read_text()) for p in tables]
    table = next(t for t in first if t["data"][0][1] == "What is 2+2?")  # step 0's (file names do not say)
    assert table["columns"][:4] == ["domain", "prompt", "completion", "reward"]
    assert table["data"][0][:4] == ["math", "What is 2+2?", "\\boxed{4}", 1.0] and len(table["data"]) == 2


def test_wandb_online_prints_the_run_url(tmp_path, monkeypatch, capsys):
    import wandb

    seen = {}

    class Run:
        url = "https://wandb.ai/me/v32rl/runs/abc123"

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or Run())
    run_dir = tmp_path / "my-run"
    Tracker(str(run_dir), load_config(["logging.wandb_mode=online", "logging.tags=[a]"]))
    assert "wandb: https://wandb.ai/me/v32rl/runs/abc123" in capsys.readouterr().out
    assert (seen["name"], seen["group"], seen["tags"], seen["mode"]) == ("my-run", None, ["a"], "online")


def test_plots_redrawn_from_a_crashed_run(tmp_path, capsys):
    rows = [{"step": s, "reward/math/total": 0.1 * s, "train/kl": 0.01 * s} for s in range(1, 5)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 5, "reward/math/tot')  # killed mid-write
    assert plots.main([str(tmp_path)]) == 0
    assert (tmp_path / "reward.png").stat().st_size > 0 and (tmp_path / "kl.png").is_file()
    assert capsys.readouterr().out.startswith("4 rows of")
    # The resumed tracker reads the same file without tripping on the cut line, and drops it.
    Tracker(str(tmp_path), load_config(["logging.wandb=false"]), resume_step=4)
    assert (tmp_path / "metrics.jsonl").read_text() == text
    # A line damaged in the middle is an error naming it, not a silent gap; no metrics at all is named too.
    (tmp_path / "metrics.jsonl").write_text(text.replace('"train/kl"', "train/kl", 1))
    assert plots.main([str(tmp_path)]) == 2 and "metrics.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert plots.main([str(tmp_path / "nothing")]) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class _Ref:
    def __init__(self, value):
        self.value = value


class _Engine:
    """An engine actor's interface without Ray: `generate.remote` returns a ref `ray.get` unwraps."""

    def __init__(self):
        self.generate = self

    def remote(self, chunk, sampling):
        return _Ref([[Sample(prompt_ids=p, response_ids=[3], status=Status.COMPLETED) for _ in range(sampling.n)]
                     for p in chunk])


@pytest.fixture
def progress_on():
    yield
    progress.enable(True)


def test_progress_bars_and_logging_progress_off(progress_on, monkeypatch):
    import ray

    from rl.distill import distill
    from rollout.engine import SamplingConfig
    from rollout.manager import RolloutManager

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))
    monkeypatch.setattr(ray, "get", lambda ref: ref.value)
    mgr = object.__new__(RolloutManager)
    mgr.engines, mgr.chunk_prompts, mgr.max_retries = [_Engine()], 2, 0

    class Learner:
        def set_lr(self, lr):
            pass

        def train_step(self, batch, loss):
            return {"nll": 1.0}

        def reset_reference(self):
            pass

    cfg = load_config(["distill.specialists={math: 'data:x.jsonl'}", "distill.batch_size=2", "distill.epochs=3"])
    demos = {"math": [_sample("p", "t", 1.0) for _ in range(4)]}

    def run():
        groups = mgr.generate([[5, 6]] * 5, SamplingConfig(n=2, max_tokens=4))
        assert [len(g) for g in groups] == [2] * 5
        return distill(cfg, None, {}, None, None, [], Learner(), demos)

    terminal = _Terminal()  # set here: pytest puts its own sys.stderr back between a fixture and the test
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run()["distill/examples"] == 4
    shown = terminal.getvalue()
    assert "generate:   0%|          | 0/10 " in shown, shown  # 5 prompts x 2 samples, in 3 chunks (transient bar)
    assert "distill (SFT): 100%" in shown and "6/6" in shown, shown  # 3 epochs x 2 batches
    terminal.seek(0)
    terminal.truncate()
    progress.enable(False)  # logging.progress=false
    run()
    assert terminal.getvalue() == ""
