"""Models: the Autoencoder/VariationalAutoencoder LightningModules and their encoders and decoders.

The conv-stack layers are re-exported here too, since configs name them ``spherinator.models.X``.
"""

from spherinator.layers import (
    ConsecutiveConv1DLayer,
    ConsecutiveConv2DLayer,
    ConsecutiveConvTranspose1DLayer,
    ConsecutiveConvTranspose2DLayer,
)
from spherinator.models.autoencoder import Autoencoder, NonFiniteLossError, VariationalAutoencoder
from spherinator.models.decoders import ConvolutionalDecoder1D, ConvolutionalDecoder2D, UpsamplingDecoder2D
from spherinator.models.encoders import ConvolutionalEncoder1D, ConvolutionalEncoder2D
from spherinator.models.huggingface import HuggingFaceEncoder, HuggingFaceResNetEncoder
from spherinator.models.mlp import MLP
from spherinator.models.sequential import Sequential
from spherinator.models.transfer import WeightsProvider
from spherinator.models.variational_encoder import VariationalEncoder
from spherinator.models.vit import HuggingFaceViTEncoder

__all__ = [
    "Autoencoder",
    "ConsecutiveConv1DLayer",
    "ConsecutiveConv2DLayer",
    "ConsecutiveConvTranspose1DLayer",
    "ConsecutiveConvTranspose2DLayer",
    "ConvolutionalDecoder1D",
    "ConvolutionalDecoder2D",
    "ConvolutionalEncoder1D",
    "ConvolutionalEncoder2D",
    "HuggingFaceEncoder",
    "HuggingFaceResNetEncoder",
    "HuggingFaceViTEncoder",
    "MLP",
    "NonFiniteLossError",
    "Sequential",
    "UpsamplingDecoder2D",
    "VariationalAutoencoder",
    "VariationalEncoder",
    "WeightsProvider",
]
