"""VGG-16 feature-matching (perceptual) reconstruction loss."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's VGG-16 "D" configuration; building the features ourselves avoids allocating the 120M-parameter
# classifier and keeps the module indices identical to ``torchvision.models.vgg16().features``.
_VGG16_CONFIG: list[int | str] = [
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
]
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


_N_FEATURES = sum(1 if v == "M" else 2 for v in _VGG16_CONFIG)  # len(vgg16().features) == 31


def _vgg16_features(n_modules: int) -> nn.Sequential:
    """The first ``n_modules`` modules of ``torchvision.models.vgg16().features`` (only those are allocated)."""
    modules: list[nn.Module] = []
    in_channels = 3
    for v in _VGG16_CONFIG:
        if len(modules) >= n_modules:
            break
        if v == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_channels = int(v)
    return nn.Sequential(*modules[:n_modules])


def _default_weights_file() -> Path:
    from torchvision.models import VGG16_Weights

    filename = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


class PerceptualLoss(nn.Module):
    """Mean squared error between frozen VGG-16 activations of the reconstruction and of the target.

    Inputs are images (B, C, H, W) in [0, 1] with C = 3 or C = 1 (grayscale is broadcast to three channels);
    they are normalised with the ImageNet mean and standard deviation. The VGG weights are not part of the model's
    state dict (checkpoints stay small); they are read from ``weights_path`` or torchvision's cache.

    Args:
        layers: Indices into ``vgg16.features`` whose outputs are compared (default: the ReLU outputs 3, 8, 15).
        weights: Weight of each tapped layer's MSE (default: all 1.0).
        weights_path: A VGG-16 state dict file (torchvision's ``vgg16-397923af.pth`` or any state dict of
            ``torchvision.models.vgg16``); None looks in ``$TORCH_HOME/hub/checkpoints``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 8, 15),
        weights: Sequence[float] | None = None,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        self.layers = [int(i) for i in layers]
        if not self.layers or any(not 0 <= i < _N_FEATURES for i in self.layers):
            raise ValueError(
                f"PerceptualLoss: layers must be indices into vgg16.features (0..{_N_FEATURES - 1}), got {list(layers)}"
            )
        self.weights = [1.0] * len(self.layers) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.layers):
            raise ValueError(
                f"PerceptualLoss: {len(self.weights)} weights for {len(self.layers)} layers ({self.weights} vs "
                f"{self.layers}); give one weight per layer"
            )
        bad = [w for w in self.weights if not (math.isfinite(w) and w >= 0.0)]
        if bad:
            raise ValueError(
                f"PerceptualLoss: weights {self.weights} has {bad[0]}; each weighs one layer's MSE and must be a "
                "finite number >= 0"
            )
        self.vgg = _vgg16_features(max(self.layers) + 1)
        self._load_vgg_weights(weights_path)
        self.vgg.requires_grad_(False)
        self.vgg.eval()
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Keep the fixed VGG weights out of checkpoints, and fill them back in when a checkpoint is loaded.
        self.register_state_dict_post_hook(_drop_vgg_from_state_dict)
        self.register_load_state_dict_pre_hook(_fill_vgg_into_state_dict)

    def _load_vgg_weights(self, weights_path: str | None) -> None:
        path = Path(weights_path) if weights_path is not None else _default_weights_file()
        if not path.is_file():
            where = f"weights_path {str(path)!r}" if weights_path is not None else f"torchvision's cache ({path})"
            raise FileNotFoundError(
                f"PerceptualLoss: no VGG-16 weights in {where}. Download "
                "https://download.pytorch.org/models/vgg16-397923af.pth to that file (or run "
                "torchvision.models.vgg16(weights='IMAGENET1K_V1') once on a machine with internet, sharing "
                "$TORCH_HOME), or pass weights_path: <file> with a torchvision VGG-16 state dict"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Accept a full torchvision VGG-16 state dict ("features.N.weight") or one of its features only.
        features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        wanted = self.vgg.state_dict().keys()
        missing = [k for k in wanted if k not in features]
        if missing:
            raise ValueError(
                f"PerceptualLoss: {path} is not a VGG-16 state dict (missing {missing[:3]}...); give the file of "
                "torchvision.models.vgg16"
            )
        self.vgg.load_state_dict({k: features[k] for k in wanted})

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # the feature extractor is fixed
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps: dict[int, torch.Tensor] = {}
        x = (x - self.mean) / self.std
        for i, module in enumerate(self.vgg):
            x = module(x)
            if i in self.layers:
                taps[i] = x
        return [taps[i] for i in self.layers]  # in the order (and multiplicity) the layers were given

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"PerceptualLoss needs images (B, 1 or 3, H, W), got shape {tuple(x.shape)}; use another "
                "reconstruction_loss for other data"
            )
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale -> 3 channels

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred_features = self._features(self._prepare(prediction))
        with torch.no_grad():
            target_features = self._features(self._prepare(target))
        loss = prediction.new_zeros((), dtype=torch.float32)
        for w, p, t in zip(self.weights, pred_features, target_features, strict=True):
            loss = loss + w * F.mse_loss(p.float(), t.float())
        return loss


def _drop_vgg_from_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "vgg.")]:
        del state_dict[key]


def _fill_vgg_into_state_dict(
    module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    for key, value in module.vgg.state_dict().items():
        state_dict.setdefault(prefix + "vgg." + key, value)
