"""Tool-use episodes rendered by the model's own chat template: the tiny template (tokens unchanged) and a
Qwen3-format one set on the tiny tokenizer (tool results inside a user turn, `reasoning_content`,
`enable_thinking`)."""
from __future__ import annotations

import re

import pytest

from rollout.agent import SUMMARY_REQUEST, TOOLS, AgentRunner, EpisodeConfig
from rollout.chat import TemplateError, continuation, encode_chat
from tests.rollout.test_agent import CODE, QUESTION, history, run_scripted, trained_runs_were_seen

# Qwen3's chat template (Qwen/Qwen3-8B tokenizer_config.json), as published: tool results are grouped into one
# user turn of <tool_response> blocks; reasoning is rendered only after the last real user query, and an
# assistant turn that is last gets a think block even when empty; enable_thinking=false pre-fills an empty one.
QWEN3_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags<|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'
                + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}
"""

TOOLS_SPEC = [TOOLS.get("python").spec()]


@pytest.fixture(params=["tiny", "qwen3"])
def tok(request, tiny_dense):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    if request.param == "qwen3":
        tok.chat_template = QWEN3_TEMPLATE
    return tok


def test_tiny_template_tool_tokens_are_unchanged(tiny_dense):
    """Golden: the ids the hand-written tiny layout ("\\n" + <|im_start|>tool turns + assistant header) gave."""
    from transformers import AutoTokenizer

    runner = AgentRunner(AutoTokenizer.from_pretrained(tiny_dense), EpisodeConfig())
    assert runner.tool_tokens(["42"]) == [201, 1, 921, 201, 1028, 201, 863, 201, 1029, 2, 201, 1, 356, 85, 295, 86, 67, 267, 201]
    assert runner.tool_tokens(["42", "error: ValueError: x"]) == [
        201, 1, 921, 201, 1028, 201, 863, 201, 1029, 2, 201, 1, 921, 201, 1028, 201, 263, 84, 302, 28, 223, 56, 294, 339,
        39, 84, 84, 302, 28, 223, 90, 201, 1029, 2, 201, 1, 356, 85, 295, 86, 67, 267, 201]


def test_qwen3_tool_results_go_in_one_user_turn(tiny_dense):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    tok.chat_template = QWEN3_TEMPLATE
    runner = AgentRunner(tok, EpisodeConfig())
    assert tok.decode(runner.tool_tokens(["42", "7"])) == (
        "\n<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\n7\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # The model's turn (its ids, ending with the stop token) + the tool tokens = the template's rendering.
    call = {"function": {"name": "python", "arguments": CODE}}
    msgs = [{"role": "user", "content": QUESTION}]
    turn = [{"role": "assistant", "reasoning_content": "run it", "content": "", "tool_calls": [call, call]}]
    prompt = encode_chat(tok, msgs, tools=TOOLS_SPEC)
    said = encode_chat(tok, msgs + turn, tools=TOOLS_SPEC, add_generation_prompt=False)
    model_turn = said[len(prompt): len(said) - len(runner.encode("\n"))]  # ends with <|im_end|>, as sampled
    assert model_turn[-1] == tok.eos_token_id
    tools = [{"role": "tool", "content": "42"}, {"role": "tool", "content": "7"}]
    assert prompt + model_turn + runner.tool_tokens(["42", "7"]) == encode_chat(tok, msgs + turn + tools, tools=TOOLS_SPEC)


@pytest.mark.parametrize("strategy", ["discard_75", "discard_all"])
def test_managed_contexts_are_the_templates_rendering(tok, strategy):
    """Under either template, each managed context is apply_chat_template of the reduced history, token for
    token, and every trained token is what the engine saw."""
    prompt, [s], engine = run_scripted(tok, strategy)
    assert s.tool_stats[f"context/{strategy}"] >= 1 and trained_runs_were_seen(s, engine.prompts)
    one = len(encode_chat(tok, history(1), tools=TOOLS_SPEC)) - len(prompt)
    for seg in s.segments[1:] + [s]:
        kept = (len(seg.prompt_ids) - len(prompt)) // one
        assert seg.prompt_ids == encode_chat(tok, history(kept), tools=TOOLS_SPEC)


def test_summary_request_is_a_user_turn_of_the_template(tok):
    prompt, [s], engine = run_scripted(tok, "summary", max_context=800)
    asks = [seg for seg in s.segments if SUMMARY_REQUEST in tok.decode(seg.prompt_ids)]
    assert asks and trained_runs_were_seen(s, engine.prompts)
    # The first ask continues the original history (later ones continue the summary's restart).
    request = [{"role": "user", "content": SUMMARY_REQUEST}]
    one = len(encode_chat(tok, history(1), tools=TOOLS_SPEC)) - len(prompt)
    turns = (len(asks[0].prompt_ids) - len(encode_chat(tok, history(0) + request, tools=TOOLS_SPEC))) // one
    assert turns >= 1 and asks[0].prompt_ids == encode_chat(tok, history(turns) + request, tools=TOOLS_SPEC)
    assert all(tok.decode(a.prompt_ids).endswith(SUMMARY_REQUEST + "<|im_end|>\n<|im_start|>assistant\n") for a in asks)


def test_template_args_come_from_the_config(tiny_dense):
    """`agent.template_args={enable_thinking: false}` reaches the prompt and the episode's tool tokens."""
    from transformers import AutoTokenizer

    from rl.config import agent_runner, load_config
    from rl.data import encode_prompt

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    tok.chat_template = QWEN3_TEMPLATE
    cfg = load_config(["agent.template_args={enable_thinking: false}"], "agent")
    row = {"prompt": QUESTION, "tools": ["python"]}
    thinking, plain = encode_prompt(tok, row), encode_prompt(tok, row, template_args=cfg.agent.template_args)
    assert thinking != plain and tok.decode(plain).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    runner = agent_runner(cfg, tok)
    assert tok.decode(runner.tool_tokens(["42"])).endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not tok.decode(AgentRunner(tok, EpisodeConfig()).tool_tokens(["42"])).endswith("</think>\n\n")
    # An episode under enable_thinking=false: every engine call's prompt ends with the pre-filled empty think block.
    prompt, [s], engine = run_scripted(tok, "none", max_context=4000, max_turns=3, template_args=cfg.agent.template_args)
    assert prompt == plain and len(engine.prompts) == 3
    assert all(tok.decode(p).endswith("<think>\n\n</think>\n\n") for p in engine.prompts)


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_dense):
    """Qwen3 renders an empty think block on an assistant turn only while it is the last message: continuing
    such a turn is not append-only, and the error names the template instead of training on a shifted context."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dense)
    tok.chat_template = QWEN3_TEMPLATE
    turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "python", "arguments": {}}}]}]
    with pytest.raises(TemplateError, match=re.escape(f"chat template of '{tiny_dense}' is not append-only")):
        continuation(tok, turn, [{"role": "tool", "content": "42"}])
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"  # no stop token anywhere
    with pytest.raises(TemplateError, match="does not end an assistant turn with the stop token '<\\|im_end\\|>'"):
        continuation(tok, turn, [{"role": "tool", "content": "42"}])
