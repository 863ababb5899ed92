"""Thinking in tool use: the retention rule, segments, tools, and a token-level episode on a real engine."""
from __future__ import annotations

import pytest

from rollout.agent import TOOLS, call_tool, render_history, run_episode, split_segments
from rollout.chat import encode_chat

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

    def generate(self, prompts, sampling):
        self.prompts.append(list(prompts[0]))
        return self.engine.generate(prompts, sampling)


@pytest.mark.slow
def test_episode_runs_tools_and_trains_on_what_the_engine_saw(tiny_dense, tmp_path):
    """Teach the tiny model (SFT, a few seconds) to call the python tool, then run an episode on the
    reference engine: the tool runs, its result is appended with loss_mask 0, every engine call saw exactly
    the episode's token stream so far."""
    from transformers import AutoTokenizer

    from rl.learner import Learner, LearnerConfig, step_totals
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
        learner.train_step([s] * 4, step_totals([s] * 4), loss="sft")
    learner.export_hf(str(tmp_path / "agent"))
    learner.shutdown()

    engine = Recording(ReferenceEngine(EngineConfig(model=str(tmp_path / "agent"), engine="reference")))
    ep = run_episode(engine, tok, prompt, SamplingConfig(n=1, temperature=0.0, max_tokens=40), max_turns=2)
    assert ep.tool_calls >= 1 and ep.tool_errors == 0
    text = tok.decode(ep.response_ids)
    assert "<tool_response>\n42\n</tool_response>" in text
    tool_start = next(i for i, m in enumerate(ep.loss_mask) if m == 0)
    assert tok.decode(ep.response_ids[:tool_start]).startswith(target)
    for p in engine.prompts:  # append-only: each call's prompt is a prefix of the final stream
        assert ep.tokens[: len(p)] == p
    assert len(ep.loss_mask) == len(ep.response_ids) == len(ep.logprobs)
