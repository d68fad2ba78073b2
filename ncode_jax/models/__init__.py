"""Models built from the core: flows with a read-out head, and autoencoders with a latent flow."""

from .autoencoder import MODEL_KINDS, Autoencoder, autoencoder
from .classifier import FlowClassifier
from .coders import ARCHITECTURES, Architecture, architecture

__all__ = ["ARCHITECTURES", "MODEL_KINDS", "Architecture", "Autoencoder", "FlowClassifier", "architecture",
           "autoencoder"]
