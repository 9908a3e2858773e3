"""Prompt sources and distillation shards."""
