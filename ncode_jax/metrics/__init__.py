"""Sample-quality metrics: the Fréchet distance (FID) and pluggable feature extractors.

* :mod:`.fid` — Fréchet distance between feature Gaussians, stable for singular covariances;
* :mod:`.digit_features` — a small digit classifier trained on a training split; its penultimate
  layer gives the features of the **"digit-feature FID"** (never to be reported as Inception FID);
* :mod:`.inception` — InceptionV3 pool3 (2048-d) features in Flax, with weights loaded from a file
  the user supplies (see ``docs/inception_weights.md``); this gives the usual "FID".

The Inception module is imported lazily (``from ncode_jax.metrics import inception``) because it
builds a large Flax model.
"""

from .fid import feature_statistics, fid_from_features, frechet_distance

__all__ = ["feature_statistics", "fid_from_features", "frechet_distance"]
