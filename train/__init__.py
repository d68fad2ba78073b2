"""Training entry points (``python -m train.<name>``) and their shared utilities."""
