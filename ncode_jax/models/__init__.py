"""Models built from the core: flows with a read-out head."""

from .classifier import FlowClassifier

__all__ = ["FlowClassifier"]
