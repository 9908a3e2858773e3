"""Prefect flows that compose koala's tasks."""
