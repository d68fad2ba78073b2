"""Training entry points (``python -m train.<name>``) on one run engine; :func:`load_run` opens any run."""

from .engine import load_run  # noqa: F401
