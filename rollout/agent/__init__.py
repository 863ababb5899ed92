"""Thinking in tool use (V3.2 section 3.2.1): tools, the retention rule, token-level episodes, context
management.

- `tools`: Python callables registered by name with a JSON schema (`TOOLS`): `python`, `search`, `read_file`.
- `episode`: the retention rule (`render_history`, `split_segments`) and the append-only token episode whose
  training segments become `Sample`s.
- `context`: context management strategies (`CONTEXT_STRATEGIES`: `none`, `summary`, `discard_75`,
  `discard_all`, `parallel_fewest_steps`), one protocol for all.
- `runner`: `AgentRunner`, which drives a batch of episodes through any engine in lock-step.
- `scripted`: `ScriptedPolicy`, an engine whose turns are written by a script (the SFT oracle, test driver).
"""
from rollout.agent.context import CONTEXT_STRATEGIES, ContextStrategy, discard_75, discard_all
from rollout.agent.episode import SUMMARY_PREFIX, SUMMARY_REQUEST, Episode, EpisodeConfig, final_turn_ids, render_history, split_segments
from rollout.agent.runner import AgentRunner, run_episode
from rollout.agent.scripted import ScriptedPolicy, oracle_script, tool_call_text
from rollout.agent.tools import TOOLS, Tool, call_tool, register_tool

__all__ = ["CONTEXT_STRATEGIES", "ContextStrategy", "discard_75", "discard_all", "SUMMARY_PREFIX", "SUMMARY_REQUEST",
           "Episode", "EpisodeConfig", "final_turn_ids", "render_history", "split_segments", "AgentRunner", "run_episode",
           "ScriptedPolicy", "oracle_script", "tool_call_text", "TOOLS", "Tool", "call_tool", "register_tool"]
