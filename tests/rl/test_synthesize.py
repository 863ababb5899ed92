"""Agentic task synthesis: generator parsing, the usability checks, and the pass-rate filter run through
the real tool-use runner, tools and verifier sandbox (a scripted policy makes the pass rates known)."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl.synthesize import Task, ToolEnv, build_lookup_env, lookup_calc, model_tasks, parse_task, synthesize, task_problem
from rollout.agent import EpisodeConfig, ScriptedPolicy, tool_call_text
from rollout.engine import SamplingConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tiny_dense):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dense)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return ToolEnv(docs=str(build_lookup_env(str(tmp_path_factory.mktemp("env")))))


def test_parse_task_from_a_model_reply(env):
    good = ('<think>a lookup</think>{"task": "What is the secret number of cat?", "tools": ["search"], '
            '"verifier": "def verify(a):\\n    return a == \'1\'"}')
    t = parse_task(good, env)
    assert isinstance(t, Task) and t.tools == ["search"] and t.verifier.startswith("def verify(a)")
    assert parse_task("no json here", env) == "no JSON object"
    assert parse_task("{task: 1}", env) == "not valid JSON"
    assert parse_task('{"task": "x"}', env) == "missing task or verifier"
    assert parse_task('{"task": "x", "verifier": "v", "tools": "python"}', env) == "tools is not a list of names"


def test_usability_checks(env):
    [calc] = [t for t in lookup_calc(env, 8, 0) if t.family == "calc"][:1]
    assert task_problem(calc, env) is None
    assert task_problem(Task("q", ["shell"], calc.verifier), env) == "unknown_tool"
    assert task_problem(Task("q", ["python"], "def verify(a) return"), env) == "verifier_broken"
    assert task_problem(Task("q", ["python"], "def verify(a):\n    return 'yes'"), env) == "verifier_broken"
    wrong = Task("q", ["python"], "def verify(a):\n    return a == '0'", ["\\boxed{1}"])
    assert task_problem(wrong, env) == "verifier_rejects_reference"


def test_lookup_tasks_are_solvable_with_the_search_tool(env):
    from rollout.agent import call_tool

    for t in (t for t in lookup_calc(env, 20, 3) if t.family == "lookup"):
        body = t.solution[0].split("<tool_call>")[1].split("</tool_call>")[0]
        value = t.solution[-1].split("{")[1].split("}")[0]
        assert f"is {value}." in call_tool(body, env.tool_context())  # top-1 search hit holds the answer


def test_filter_keeps_tasks_the_policy_sometimes_solves(tok, env):
    """Three tasks: the scripted policy always solves A, never B, and C on every other attempt."""
    tasks = [Task(f"Use the python tool: what is {a} * 3?", ["python"], f"def verify(x):\n    return x == '{a * 3}'",
                  family=name) for a, name in ((11, "A"), (12, "B"), (13, "C"))]
    attempts = itertools.count()

    def script(text):
        if "<tool_response>" not in text:
            a = int(text.split("what is ")[-1].split(" *")[0])
            return tool_call_text("python", {"code": f"print({a} * 3)"})
        result = text.split("<tool_response>\n")[-1].split("\n")[0]
        if "what is 12" in text or ("what is 13" in text and next(attempts) % 2):
            return "\\boxed{0}"
        return f"The answer is \\boxed{{{result}}}."

    broken = Task("q", ["python"], "def verify(a) return")
    rows, counts = synthesize([*tasks, broken, "no JSON object"], env, ScriptedPolicy(tok, script), tok, 4,
                              SamplingConfig(max_tokens=48, seed=0), EpisodeConfig(max_turns=3, max_context=1024))
    assert counts == {"generated": 5, "all_pass": 1, "all_fail": 1, "kept": 1, "verifier_broken": 1, "unparseable": 1}
    assert [(r["family"], r["pass_rate"]) for r in rows] == [("C", 0.5)]
    assert rows[0]["domain"] == "agent" and rows[0]["tools"] == ["python"]


def test_model_generator_through_an_engine(tok, env):
    reply = json.dumps({"task": "Use the search tool: what is the secret number of cat?", "tools": ["search"],
                        "verifier": "def verify(a):\n    return a.isdigit()"})
    gen = ScriptedPolicy(tok, lambda text: reply if "Reply with JSON only" in text else "?")
    tasks = model_tasks(env, 3, 0, writer=gen, tokenizer=tok, max_tokens=512)
    assert len(tasks) == 3 and all(isinstance(t, Task) and task_problem(t, env) is None for t in tasks)
    assert '"name": "search"' in tok.decode(gen.prompts[0])  # the tools were shown to the generator


def test_cli_errors_name_the_argument(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rl.synthesize", "--env", str(tmp_path), "--out", str(tmp_path / "o.jsonl"),
                          "--no-filter"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == f"error: --env: '{tmp_path}' has no docs/ directory"
    res = subprocess.run([sys.executable, "-m", "rl.synthesize", "--env", "examples/agent/env", "--out", str(tmp_path / "o.jsonl")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: --policy: required unless --no-filter (the pass-rate filter runs the policy)"


def test_shipped_example_data_is_the_generator_output(tmp_path):
    """examples/agent/*.jsonl are reproducible from the template generator."""
    env = ToolEnv(docs=str(ROOT / "examples/agent/env/docs"))
    shipped = [json.loads(line) for line in (ROOT / "examples/agent/eval.jsonl").read_text().splitlines()]
    assert shipped == [t.row() for t in lookup_calc(env, 100, 1)]
