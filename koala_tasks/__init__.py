"""Prefect tasks: thin wrappers over `koala/` with retries, cache keys and tags."""
