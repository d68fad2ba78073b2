"""PyTorch + torchdiffeq baseline for the benchmarks (needs the ``torch`` extra).

The same models as ncode_jax, with the same flat-θ layouts, so that JAX parameters load unchanged
(:func:`~benchmarks.torch_baseline.core.load_jax_params`):

* :mod:`.toy` — ``ToyNCODE``: ``NCODE.build(kind, MLPField(dim, hidden), (dim,))``, kind
  ``node``/``open``/``closed``;
* :mod:`.conv` — ``ConvNCODE``: ``ncode_jax.models.image_classifier(kind, image_shape)``, kind
  ``node``/``anode``/``open``/``closed``, per-sample kernels the fastest measured way;
* :mod:`.latent_flow` — ``LatentFlow``: the AutoN-CODE latent flow ``dx/dt = A(θ) x``
  (``SparseLinearField``).
"""

from .conv import ConvNCODE, per_sample_conv3x3
from .core import grads_as_jax_tree, load_jax_params
from .latent_flow import LatentFlow
from .toy import ToyNCODE, solve_toy

__all__ = ["ConvNCODE", "LatentFlow", "ToyNCODE", "grads_as_jax_tree", "load_jax_params",
           "per_sample_conv3x3", "solve_toy"]
