"""Experiment configurations: each module defines ``get_config() -> dict``."""
