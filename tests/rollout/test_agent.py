"""Thinking in tool use: the retention rule, segments, tools, and a token-level episode on a real engine."""
from __future__ import annotations

import pytest

from rollout.agent import (
    CONTEXT_STRATEGIES,
    SUMMARY_PREFIX,
    SUMMARY_REQUEST,
    TOOLS,
    AgentRunner,
    Episode,
    EpisodeConfig,
    ScriptedPolicy,
    call_tool,
    render_history,
    run_episode,
    split_segments,
    tool_call_text,
)
from rollout.chat import encode_chat
from rollout.engine import SamplingConfig

CALL = {"function": {"name": "python", "arguments": {"code": "print(6*7)"}}}
CONVO = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "reasoning_content": "think-a", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "reasoning_content": "think-b", "content": "\\boxed{42}"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "reasoning_content": "think-c", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "42"},
]


def test_retention_rule_drops_reasoning_only_before_the_last_user_message(tiny_dense):
    from transformers import AutoTokenizer

    kept = render_history(CONVO)
    assert [m.get("reasoning_content") for m in kept] == [None, None, None, None, None, "think-c", None]
    assert kept[1]["tool_calls"] == [CALL] and kept[2]["content"] == "42"  # calls and results always kept
    text = AutoTokenizer.from_pretrained(tiny_dense).apply_chat_template(kept, tokenize=False)
    assert "think-a" not in text and "think-b" not in text and "<think>\nthink-c\n</think>" in text
    assert text.count("<tool_call>") == 2 and text.count("<tool_response>") == 2
    # Within the second user turn the stream is append-only: the turn's prefix does not change as it grows.
    tok = AutoTokenizer.from_pretrained(tiny_dense)
    short = encode_chat(tok, render_history(CONVO[:6]), add_generation_prompt=False)
    long = encode_chat(tok, render_history(CONVO), add_generation_prompt=False)
    assert long[: len(short)] == short


def test_segments_split_at_user_messages():
    segs = split_segments(CONVO)
    assert [len(s) for s in segs] == [4, 7] and segs[1][4]["content"] == "q2"


def test_tool_failures_become_messages(tmp_path):
    assert call_tool('{"name": "nope", "arguments": {}}', {}).startswith("error: ValueError: Unsupported tool 'nope'")
    assert call_tool("{not json", {}).startswith("error: JSONDecodeError")
    assert call_tool('{"name": "python", "arguments": {"code": "print(6*7)"}}', {}).strip() == "42"
    assert call_tool('{"name": "python", "arguments": {"code": "while True: pass"}}', {"python": {"timeout_s": 1}}) == "error: timed out"
    (tmp_path / "paris.txt").write_text("Paris is the capital of France.\nMore text.")
    (tmp_path / "rome.txt").write_text("Rome is the capital of Italy.")
    ctx = {"search": {"root": str(tmp_path)}, "read_file": {"root": str(tmp_path)}}
    assert call_tool('{"name": "search", "arguments": {"query": "capital of France"}}', ctx).startswith("paris.txt: Paris")
    assert call_tool('{"name": "read_file", "arguments": {"path": "rome.txt"}}', ctx) == "Rome is the capital of Italy."
    assert call_tool('{"name": "read_file", "arguments": {"path": "../x"}}', ctx) == "error: path outside the document root"
    assert sorted(TOOLS.names()) == ["python", "read_file", "search"]


class Recording:
    """The real engine, with the prompts it was given recorded (to check the append-only stream)."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def generate(self, prompts, sampling, stats=None):
        self.prompts.append(list(prompts[0]))
        return self.engine.generate(prompts, sampling)


@pytest.mark.slow
def test_episode_runs_tools_and_trains_on_what_the_engine_saw(tiny_dense, tmp_path):
    """Teach the tiny model (SFT, a few seconds) to call the python tool, then run an episode on the
    reference engine: the tool runs, its result is appended with loss_mask 0, every engine call saw exactly
    the episode's token stream so far."""
    from transformers import AutoTokenizer

    from rl.learner import Learner, LearnerConfig, plan_step
    from rollout.engine import EngineConfig, SamplingConfig
    from rollout.reference_engine import ReferenceEngine
    from rollout.sample import Sample, Status

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    prompt = encode_chat(tok, [{"role": "user", "content": "what is 6 times 7?"}])
    target = '<tool_call>\n{"name": "python", "arguments": {"code": "print(6*7)"}}\n</tool_call>'
    resp = list(tok(target, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    s = Sample(prompt_ids=prompt, response_ids=resp, logprobs=[0.0] * len(resp), loss_mask=[1] * len(resp), status=Status.COMPLETED)
    learner = Learner(LearnerConfig(model=tiny_dense, lr=3e-3))
    for _ in range(60):
        learner.train_step([s] * 4, plan_step([s] * 4), loss="sft")
    learner.export_hf(str(tmp_path / "agent"))
    learner.shutdown()

    engine = Recording(ReferenceEngine(EngineConfig(model=str(tmp_path / "agent"), engine="reference")))
    ep = run_episode(engine, tok, prompt, SamplingConfig(n=1, temperature=0.0, max_tokens=40), max_turns=2)
    assert ep.tool_stats["tool_calls"] >= 1 and ep.tool_stats["tool_errors"] == 0
    text = tok.decode(ep.response_ids)
    assert "<tool_response>\n42\n</tool_response>" in text
    tool_start = next(i for i, m in enumerate(ep.loss_mask) if m == 0)
    assert tok.decode(ep.response_ids[:tool_start]).startswith(target)
    tokens = ep.prompt_ids + ep.response_ids
    for p in engine.prompts:  # append-only: each call's prompt is a prefix of the trained stream
        assert tokens[: len(p)] == p
    ep.validate()


# ---- context management (scripted policy: deterministic turns through the real runner and tools) ------

QUESTION = "what is 7 to the power 150?"
CODE = {"code": "print(7 ** 150)"}


def looping_script(text: str) -> str:
    """Calls the python tool forever (fills the context); writes a summary when asked for one."""
    if SUMMARY_REQUEST in text:
        return "7 ** 150 has 127 digits; still need the answer"
    return tool_call_text("python", CODE)


def run_scripted(tok, strategy, n=1, max_context=600, max_turns=10, script=looping_script, parallel=3, template_args=None):
    engine = ScriptedPolicy(tok, script)
    cfg = EpisodeConfig(max_turns=max_turns, max_context=max_context, strategy=strategy, parallel=parallel,
                        template_args=template_args or {})
    prompt = encode_chat(tok, [{"role": "user", "content": QUESTION}], tools=[TOOLS.get("python").spec()], **cfg.template_args)
    [samples] = AgentRunner(tok, cfg).run(engine, [prompt], SamplingConfig(n=n, max_tokens=64, seed=0))
    return prompt, samples, engine


def trained_runs_were_seen(sample, engine_prompts) -> bool:
    """Every run of trained tokens starts where an engine call's prompt ended: the tokens trained and
    their contexts are exactly what the engine saw."""
    seen = {tuple(p) for p in engine_prompts}
    for seg in [*sample.segments, sample]:
        seg.validate()
        toks = seg.prompt_ids + seg.response_ids
        starts = [i for i, m in enumerate(seg.loss_mask) if m and (i == 0 or not seg.loss_mask[i - 1])]
        if any(tuple(toks[: len(seg.prompt_ids) + r]) not in seen for r in starts):
            return False
    return True


def history(turns: int) -> list[dict]:
    call = {"function": {"name": "python", "arguments": CODE}}
    msgs = [{"role": "user", "content": QUESTION}]
    for _ in range(turns):
        msgs += [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": str(7**150)}]
    return msgs


def test_no_management_truncates_at_the_budget(tiny_dense):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    prompt, [s], engine = run_scripted(tok, "none")
    assert s.status.value == "truncated" and not s.segments and s.tool_stats["segments"] == 1
    assert len(s.prompt_ids) + len(s.response_ids) <= 600 and trained_runs_were_seen(s, engine.prompts)


@pytest.mark.parametrize("strategy", ["discard_75", "discard_all"])
def test_discard_strategies_rebuild_the_context_the_template_would_render(tiny_dense, strategy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    prompt, [s], engine = run_scripted(tok, strategy)
    fired = s.tool_stats[f"context/{strategy}"]
    assert fired >= 1 and len(s.segments) == fired and s.tool_stats["turns"] == 10
    assert trained_runs_were_seen(s, engine.prompts)
    # Each managed context is the chat template's rendering of the reduced history (token for token).
    tools = [TOOLS.get("python").spec()]
    for seg in s.segments[1:] + [s]:
        kept = (len(seg.prompt_ids) - len(prompt)) // len(encode_chat(tok, history(1), tools=tools)[len(prompt):])
        assert seg.prompt_ids == encode_chat(tok, history(kept), tools=tools)
        assert kept == 0 if strategy == "discard_all" else kept >= 1
    # The trigger: a segment is closed once its context reached 80% of the budget.
    for seg in s.segments:
        assert len(seg.prompt_ids) + len(seg.response_ids) >= 0.8 * 600 - 64


def test_discard_75_keeps_the_newest_quarter():
    from rollout.agent import discard_75

    ep = Episode([1], [1], turns=[[i] for i in range(8)])
    assert discard_75(ep) == [[6], [7]]
    ep.turns = [[0], [1], [2]]
    assert discard_75(ep) == [[2]]  # int(0.75 * 3) = 2 turns dropped
    ep.turns = [[0]]
    assert discard_75(ep) == []  # at least one turn goes, or the context would never shrink


def test_summary_restarts_from_question_and_summary(tiny_dense):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    prompt, [s], engine = run_scripted(tok, "summary", max_context=800)
    assert s.tool_stats["context/summary"] >= 1 and trained_runs_were_seen(s, engine.prompts)
    asks = [seg for seg in s.segments if SUMMARY_REQUEST in tok.decode(seg.prompt_ids)]
    assert len(asks) == s.tool_stats["context/summary"]
    summary_ids = asks[0].response_ids[:-1]  # without <|im_end|>
    assert tok.decode(summary_ids) == "7 ** 150 has 127 digits; still need the answer"
    after = s.segments[s.segments.index(asks[0]) + 1] if asks[0] is not s.segments[-1] else s
    prefix = prompt + list(tok(SUMMARY_PREFIX, add_special_tokens=False)["input_ids"]) + summary_ids
    assert after.prompt_ids[: len(prefix)] == prefix  # the summary's own tokens, not a re-tokenisation


def test_parallel_fewest_steps_keeps_the_shortest_finished_candidate(tiny_dense):
    from transformers import AutoTokenizer

    from rollout.sample import Status

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    calls = iter(range(10**6))

    def script(text):  # answers on every third call: candidates of one episode finish after different turns
        return "\\boxed{1}" if next(calls) % 3 == 0 else tool_call_text("python", CODE)

    prompt, samples, engine = run_scripted(tok, "parallel_fewest_steps", n=2, max_context=4000, script=script, parallel=3)
    assert len(samples) == 2 and all(s.tool_stats["context/parallel_discarded"] == 2 for s in samples)
    assert engine.prompts[0] == prompt and sum(p == prompt for p in engine.prompts) == 1  # one request, n = 2 x 3
    finished = [s for s in samples if s.status is Status.COMPLETED]
    assert finished and all(s.tool_stats["turns"] == 1 for s in finished)  # a candidate answered at once
    eps = [Episode([1], [1]) for _ in range(3)]
    for e, (turns, status) in zip(eps, [(3, Status.COMPLETED), (5, Status.TRUNCATED), (2, Status.COMPLETED)]):
        e.stats["turns"], e.status = turns, status
    assert CONTEXT_STRATEGIES.get("parallel_fewest_steps").select(eps) is eps[2]
