"""A scripted policy: turns written by a function instead of sampled (the SFT oracle and a deterministic
test driver), and the tool-call text the chat template writes."""
from __future__ import annotations

import json
from typing import Callable

from rollout.sample import Sample, Status


class ScriptedPolicy:
    """An engine whose turns are written by `script(prompt_text) -> text` instead of sampled: the oracle
    that produces SFT trajectories from a task's reference solution (`oracle_script`), and a
    deterministic driver for the context-management tests. Same interface as the real engines."""

    def __init__(self, tokenizer, script: Callable[[str], str], logprob: float = -0.1):
        self.tok, self.script, self.logprob, self.prompts = tokenizer, script, logprob, []

    def generate(self, prompts, sampling, stats=None) -> list[list[Sample]]:
        """`rollout.engine.Generator`: n copies of the scripted turn per prompt."""
        groups = []
        for p in prompts:
            self.prompts.append(list(p))
            text = self.script(self.tok.decode(p))
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])[: sampling.max_tokens - 1]
            ids.append(self.tok.eos_token_id)
            groups.append([Sample(prompt_ids=list(p), response_ids=list(ids), logprobs=[self.logprob] * len(ids),
                                  loss_mask=[1] * len(ids), status=Status.COMPLETED, finish_reason="stop")
                           for _ in range(sampling.n)])
        return groups


def tool_call_text(name: str, arguments: dict) -> str:
    """A tool call as the chat template writes it."""
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(arguments)}}}\n</tool_call>'


def oracle_script(solutions: dict[str, list[str]]) -> Callable[[str], str]:
    """question text -> the solution's turns; the turn is the number of tool results already in the prompt."""
    def script(prompt_text: str) -> str:
        for question, turns in solutions.items():
            if f"user\n{question}<|im_end|>" in prompt_text:  # the user turn, not a substring of another
                return turns[min(prompt_text.count("<tool_response>"), len(turns) - 1)]
        raise KeyError(f"no scripted solution for prompt ending {prompt_text[-200:]!r}")

    return script
