"""Tests for difusi.prompts (parser, tokens, conditioning)."""
