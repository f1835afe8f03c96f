"""Prompts: A1111 syntax (parser) -> CLIP tokens in 77-token chunks (tokens) -> text-encoder
conditioning (conditioning). See docs/ARCHITECTURE.md, section "prompts"."""

from difusi.prompts.parser import BREAK, get_prompt_schedule, parse_prompt_attention

__all__ = ["BREAK", "get_prompt_schedule", "parse_prompt_attention"]
