"""Training callbacks: KL annealing, reconstruction images and the latent sphere map."""

from spherinator.callbacks.kl_annealing import KLAnnealing
from spherinator.callbacks.latent_sphere import LogLatentSphere
from spherinator.callbacks.log_reconstruction import LogReconstructionCallback

__all__ = ["KLAnnealing", "LogLatentSphere", "LogReconstructionCallback"]
