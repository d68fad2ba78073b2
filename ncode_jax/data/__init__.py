"""Datasets. Toy problems of the paper's section 5.1 live in :mod:`ncode_jax.data.toy`."""

from .toy import annuli, reflection

__all__ = ["annuli", "reflection"]
