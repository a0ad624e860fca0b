"""Training callbacks: KL annealing, reconstruction images, the latent sphere map, figures of the sphere's quality,
the embedding writer, a progress bar for log files and upstream's parameter manager."""

from spherinator.callbacks.embeddings import EmbeddingWriter
from spherinator.callbacks.kl_annealing import KLAnnealing
from spherinator.callbacks.latent_sphere import LogLatentSphere
from spherinator.callbacks.log_reconstruction import LogReconstructionCallback
from spherinator.callbacks.param_manager import ParamConfig, ParamManager
from spherinator.callbacks.progress import LineProgressBar
from spherinator.callbacks.sphere_quality import SphereQuality

__all__ = [
    "EmbeddingWriter",
    "KLAnnealing",
    "LineProgressBar",
    "LogLatentSphere",
    "LogReconstructionCallback",
    "ParamConfig",
    "ParamManager",
    "SphereQuality",
]
