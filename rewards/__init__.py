"""Reward scorers (import without torch, Ray or vLLM)."""
