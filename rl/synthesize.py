"""Agentic task synthesis: (task, tools, verifier) triples for a tool environment, kept when they are hard
to solve and easy to verify.

    python -m rl.synthesize --env examples/agent/env --policy CKPT --out tasks.jsonl [--generator model --generator-model CKPT]
    python -m rl.synthesize --env examples/agent/env --no-filter --out seed.jsonl   # unfiltered seed tasks

1. A generator proposes tasks: `model` asks a model (any local HF checkpoint, through the rollout engine)
   to write a JSON triple for the environment; `lookup_calc` is the example environment's template
   generator (its documents' facts and arithmetic), which also writes a reference solution.
2. A task is usable when its tools exist and its verifier runs in the sandbox (and accepts the reference
   answer, when there is one).
3. The current policy runs each usable task k times through the real tool-use runner; a task is kept
   when its verifier pass rate is strictly between 0 and 1.
The output is JSONL rows (`prompt`, `domain`, `tools`, `verifier`, `solution`, `pass_rate`) that
`rl.train` trains on directly (reward spec: the `verifier` scorer).

Deviations from V3.2 (section 3.2.3): the paper's synthesis agent also builds the environments and tools
(databases, code); here the environment (tools + documents) is given and only tasks and verifiers are
generated. The paper keeps tasks with non-zero pass@100 of a strong model and a non-trivial pass rate of
the policy; here one policy and one k decide both ends.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from rewards.registry import Registry
from rewards.rule import final_answer
from rewards.verifier import run_verifier, verifier_scorer
from rollout.agent import TOOLS, AgentRunner, EpisodeConfig, final_turn_ids, tool_call_text
from rollout.engine import Generator, SamplingConfig

TASK_GENERATORS: Registry = Registry("task generator")


@dataclass
class Task:
    prompt: str
    tools: list[str]
    verifier: str  # Python source defining verify(answer: str) -> bool
    solution: list[str] | None = None  # reference turns (tool calls, then the answer): the SFT oracle
    family: str = "model"

    def row(self, domain: str = "agent", **extra) -> dict:
        return {"prompt": self.prompt, "domain": domain, "tools": self.tools, "verifier": self.verifier,
                "solution": self.solution, "family": self.family, "language": "en", **extra}


@dataclass(frozen=True)
class ToolEnv:
    """A tool environment: the tools offered and the document root of `search` / `read_file`."""

    docs: str
    tools: tuple[str, ...] = ("python", "search", "read_file")
    search_k: int = 1

    def tool_context(self) -> dict:
        return {"search": {"root": self.docs, "k": self.search_k}, "read_file": {"root": self.docs}}


# ---- generators ------------------------------------------------------------------------------------------

_FACT = re.compile(r"The secret number of (\w+) is (\d+)\.")


def _equals(value: str) -> str:
    return f"def verify(answer):\n    return answer.strip() == {value!r}\n"


@TASK_GENERATORS.register("lookup_calc")
def lookup_calc(env: ToolEnv, n: int, seed: int, **_) -> list[Task | str]:
    """The example environment's template tasks: look a fact up with `search`, or compute with `python`."""
    facts = [m.groups() for p in sorted(Path(env.docs).glob("*.txt")) for m in _FACT.finditer(p.read_text())]
    rng, out = random.Random(seed), []
    for _ in range(n):
        if facts and rng.random() < 0.5:
            name, value = rng.choice(facts)
            out.append(Task(f"Use the search tool: what is the secret number of {name}?", ["search"], _equals(value),
                            [tool_call_text("search", {"query": f"secret number of {name}"}), f"The answer is \\boxed{{{value}}}."],
                            "lookup"))
        else:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            out.append(Task(f"Use the python tool: what is {a} * {b}?", ["python"], _equals(str(a * b)),
                            [tool_call_text("python", {"code": f"print({a} * {b})"}), f"The answer is \\boxed{{{a * b}}}."],
                            "calc"))
    return out


GENERATOR_PROMPT = """You write tasks for an agent that can call these tools:
{tools}
Documents the search and read_file tools see (name: first line):
{docs}
Write one new task that needs the tools and has a single checkable answer. Reply with JSON only:
{{"task": "...", "tools": ["..."], "verifier": "def verify(answer):\\n    return ..."}}"""


def parse_task(text: str, env: ToolEnv) -> Task | str:
    """A Task from a generator model's reply, or why the reply is unusable."""
    answer = text.split("</think>")[-1]
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end <= start:
        return "no JSON object"
    try:
        obj = json.loads(answer[start : end + 1])
    except json.JSONDecodeError:
        return "not valid JSON"
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("task", "verifier")):
        return "missing task or verifier"
    tools = obj.get("tools") or list(env.tools)
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        return "tools is not a list of names"
    return Task(obj["task"].strip(), tools, obj["verifier"], None, "model")


@TASK_GENERATORS.register("model")
def model_tasks(env: ToolEnv, n: int, seed: int, writer=None, tokenizer=None, temperature: float = 1.0,
                max_tokens: int = 512, **_) -> list[Task | str]:
    """A model (`writer`, a Generator) writes the triples (one sample per task, temperature 1 for variety)."""
    from rollout.chat import encode_chat

    if writer is None:
        raise ValueError("the model generator needs --generator-model (a local HF checkpoint)")
    docs = "\n".join(f"{p.name}: {p.read_text(errors='replace').splitlines()[0][:120]}"
                     for p in sorted(Path(env.docs).glob("*.txt"))[:20]) or "(none)"
    tools = "\n".join(json.dumps(TOOLS.get(t).spec()) for t in env.tools)
    prompt = encode_chat(tokenizer, [{"role": "user", "content": GENERATOR_PROMPT.format(tools=tools, docs=docs)}])
    [outs] = writer.generate([prompt], SamplingConfig(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed))
    return [parse_task(tokenizer.decode(s.response_ids, skip_special_tokens=True), env) for s in outs]


# ---- the filter ------------------------------------------------------------------------------------------

def task_problem(task: Task, env: ToolEnv) -> str | None:
    """Why a task cannot be used: unknown tools, or a verifier that does not run or rejects the reference."""
    unknown = [t for t in task.tools if t not in TOOLS or t not in env.tools]
    if unknown:
        return "unknown_tool"
    probes = [final_answer(task.solution[-1])] if task.solution else [""]
    verdicts = run_verifier(task.verifier, probes)
    if isinstance(verdicts, str) or any(v not in (True, False) for v in verdicts):
        return "verifier_broken"
    if task.solution and verdicts[0] is not True:
        return "verifier_rejects_reference"
    return None


def pass_rates(tasks: list[Task], policy: Generator, tokenizer, env: ToolEnv, k: int, sampling: SamplingConfig,
               episode: EpisodeConfig) -> list[float]:
    """Each task's verifier pass rate over k episodes of the policy (real tools, real engine)."""
    from rl.data import encode_prompt

    runner = AgentRunner(tokenizer, replace(episode, tool_context={**env.tool_context(), **episode.tool_context}))
    prompts = [encode_prompt(tokenizer, t.row()) for t in tasks]
    groups = runner.run(policy, prompts, replace(sampling, n=k))
    texts = [tokenizer.decode(final_turn_ids(s), skip_special_tokens=True) for g in groups for s in g]
    # The scorer runs each task's verifier once for its k answers; a broken verifier (None) is no pass.
    scores = verifier_scorer(texts, verifier=[t.verifier for t in tasks for _ in range(k)])
    return [sum(score == 1.0 for score in scores[i * k : (i + 1) * k]) / k for i in range(len(tasks))]


def synthesize(candidates: list[Task | str], env: ToolEnv, policy: Generator, tokenizer, k: int, sampling: SamplingConfig,
               episode: EpisodeConfig) -> tuple[list[dict], Counter]:
    """Kept rows and the count of every outcome (unparseable / unknown_tool / verifier_broken /
    verifier_rejects_reference / all_pass / all_fail / kept)."""
    counts: Counter = Counter(generated=len(candidates))
    usable = []
    for c in candidates:
        reason = c if isinstance(c, str) else task_problem(c, env)
        if reason is None:
            usable.append(c)
        else:
            counts["unparseable" if isinstance(c, str) else reason] += 1
    rates = pass_rates(usable, policy, tokenizer, env, k, sampling, episode) if usable else []
    rows = []
    for task, rate in zip(usable, rates):
        if rate == 0.0:
            counts["all_fail"] += 1
        elif rate == 1.0:
            counts["all_pass"] += 1
        else:
            counts["kept"] += 1
            rows.append(task.row(pass_rate=rate))
    return rows, counts


def write_rows(rows: list[dict], out: str) -> None:
    """Atomic: a partial file never replaces a previous one."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def build_lookup_env(root: str, seed: int = 0, n_docs: int = 30) -> Path:
    """The example environment's documents: one fact per file (deterministic)."""
    from rl.synthetic import WORDS

    docs = Path(root) / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for word in WORDS[:n_docs]:
        (docs / f"{word}.txt").write_text(f"The secret number of {word} is {rng.randint(100, 999)}.\n"
                                          f"It was written down by the keeper of {word}.\n")
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Synthesise agentic tasks and keep the ones the policy sometimes solves.")
    p.add_argument("--env", required=True, help="environment directory (its docs/ holds the search documents)")
    p.add_argument("--policy", help="the current policy: a local HF checkpoint (needed unless --no-filter)")
    p.add_argument("--no-filter", action="store_true", help="keep every usable task (no pass-rate filter): seed data for SFT warm-up")
    p.add_argument("--out", required=True)
    p.add_argument("--generator", default="lookup_calc", help=f"one of {TASK_GENERATORS.names()}")
    p.add_argument("--generator-model", help="for --generator model: a local HF checkpoint")
    p.add_argument("--num-tasks", type=int, default=64)
    p.add_argument("--k", type=int, default=8, help="policy attempts per task")
    p.add_argument("--engine", default="reference", help="rollout engine: reference | vllm")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from rl.components import engine_config
    from rl.config import RolloutConfig
    from rollout.engine import check_model_dir, make_engine

    try:
        env = ToolEnv(docs=str(Path(a.env) / "docs"))
        if not Path(env.docs).is_dir():
            raise FileNotFoundError(f"--env: '{a.env}' has no docs/ directory")
        if not a.no_filter and not a.policy:
            raise ValueError("--policy: required unless --no-filter (the pass-rate filter runs the policy)")
        if not a.no_filter:
            check_model_dir(a.policy, "--policy")
        gen = TASK_GENERATORS.get(a.generator)
        if a.generator_model:
            check_model_dir(a.generator_model, "--generator-model")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rollout = RolloutConfig(engine=a.engine, dtype="float32", enforce_eager=True, max_model_len=a.max_context + a.max_tokens)
    engine_cfg = lambda m: engine_config(rollout, m, seed=a.seed)  # noqa: E731  (the driver's construction path)
    extra = {}
    if a.generator_model:
        gen_engine = make_engine(engine_cfg(a.generator_model))
        extra = {"writer": gen_engine, "tokenizer": AutoTokenizer.from_pretrained(a.generator_model)}
    candidates = gen(env, a.num_tasks, a.seed, **extra)
    if a.no_filter:
        rows = [c.row() for c in candidates if not isinstance(c, str) and task_problem(c, env) is None]
        write_rows(rows, a.out)
        print(f"wrote {len(rows)} of {len(candidates)} tasks to {a.out} (usable, not filtered by pass rate)")
        return 0
    policy = make_engine(engine_cfg(a.policy))
    rows, counts = synthesize(candidates, env, policy, AutoTokenizer.from_pretrained(a.policy), a.k,
                              SamplingConfig(temperature=1.0, max_tokens=a.max_tokens, seed=a.seed),
                              EpisodeConfig(max_turns=a.max_turns, max_context=a.max_context))
    write_rows(rows, a.out)
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print(f"wrote {len(rows)} tasks to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
