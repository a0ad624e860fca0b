"""Training callbacks: KL annealing, reconstruction images, the latent sphere map, figures of the sphere's quality
and the embedding writer."""

from spherinator.callbacks.embeddings import EmbeddingWriter
from spherinator.callbacks.kl_annealing import KLAnnealing
from spherinator.callbacks.latent_sphere import LogLatentSphere
from spherinator.callbacks.log_reconstruction import LogReconstructionCallback
from spherinator.callbacks.sphere_quality import SphereQuality

__all__ = ["EmbeddingWriter", "KLAnnealing", "LogLatentSphere", "LogReconstructionCallback", "SphereQuality"]
