"""Hugging Face vision backbones as encoders, loaded through the Auto classes (any vision model of ``transformers``).

``model_name`` is a hub id, read from the local Hugging Face cache (``HF_HOME``; offline with ``HF_HUB_OFFLINE=1``)
or the hub, or a local directory written by ``save_pretrained``. The pretrained weights are the start; ``weights``
(see :mod:`spherinator.models.transfer`) replaces them with those of an earlier run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spherinator.errors import ConfigError
from spherinator.models._shapes import as_shape
from spherinator.models.transfer import WeightsProvider, apply_transfer

_POOLINGS = ("auto", "pooler", "cls", "mean")


def load_backbone(model_name: str, owner: str, kind: str = "Hugging Face model", model_class: Any = None,
                  **kwargs: object) -> nn.Module:  # fmt: skip
    """``model_class.from_pretrained(model_name)`` (default ``AutoModel``); a name that does not load is one
    ConfigError naming the fix."""
    from transformers import AutoModel  # heavy import, only when a Hugging Face encoder is used

    try:
        return (model_class or AutoModel).from_pretrained(model_name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{owner}: cannot load {kind} {model_name!r} ({first}). Give a hub id that is in the local "
            "Hugging Face cache (HF_HOME; offline: HF_HUB_OFFLINE=1) or reachable, or a local directory written "
            "with save_pretrained"
        ) from err


def _hidden_size(config: object) -> int | None:
    sizes = getattr(config, "hidden_sizes", None)  # conv nets (ResNet, ConvNeXt): the last stage's channels
    if sizes:
        return int(sizes[-1])
    size = getattr(config, "hidden_size", None)  # transformers (ViT, DeiT, DINOv2, Swin)
    return int(size) if size is not None else None


class HuggingFaceEncoder(nn.Module):
    """Any Hugging Face vision backbone (``AutoModel``): its pooled features, optionally projected to ``output_dim``.

    Attributes: ``backbone`` (the ``transformers`` model; ``resnet`` in the subclass), ``input_dim`` (the sample
    shape when the model fixes it, as a ViT does, or the one given; else None: any size), ``output_dim``.

    Args:
        model_name: Hub id (needs the local Hugging Face cache or the hub) or a ``save_pretrained`` directory.
        output_dim: Size of a linear projection of the features; None keeps the backbone's feature size.
        freeze: Fix the backbone's weights (the projection stays trainable).
        weights: Start the whole encoder from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider``.
        input_dim: Sample shape [C, H, W]; None takes the model's own (ViT) or leaves it open (conv nets).
        pooling: ``pooler`` (the model's pooled output), ``cls`` (first token), ``mean`` (mean over tokens or
            pixels), ``auto`` (the pooled output when the model has one, else ``cls`` for tokens, ``mean`` for maps).
    """

    def __init__(
        self,
        model_name: str,
        output_dim: int | None = None,
        freeze: bool = False,
        weights: str | WeightsProvider | None = None,
        input_dim: list[int] | None = None,
        pooling: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if pooling not in _POOLINGS:
            raise ConfigError(f"{name}: pooling {pooling!r} is not one of {', '.join(_POOLINGS)}")
        if output_dim is not None and int(output_dim) <= 0:
            raise ConfigError(f"{name}: output_dim must be a positive integer or null, got {output_dim!r}")
        self.model_name = model_name
        self.pooling = pooling
        self.add_module(self._backbone_attr, load_backbone(model_name, name))  # state dict names: backbone.*
        config = self.backbone.config
        self.input_dim = self._input_shape(config, input_dim)
        hidden = _hidden_size(config) or self._measure_features()
        self.output_dim = int(output_dim) if output_dim is not None else hidden
        self.projection = nn.Linear(hidden, self.output_dim) if output_dim is not None else nn.Identity()
        apply_transfer(self, weights, freeze, frozen=self.backbone)

    _backbone_attr = "backbone"

    @property
    def backbone(self) -> nn.Module:
        """The ``transformers`` model."""
        module = self._modules.get(self._backbone_attr)
        if module is None:  # while __init__ registers it (add_module asks hasattr first)
            raise AttributeError("backbone")
        return module

    def _input_shape(self, config: object, given: list[int] | None) -> tuple[int, ...] | None:
        name = type(self).__name__
        shape = as_shape(given, 3, "input_dim", name)
        size = getattr(config, "image_size", None)
        if isinstance(size, int):  # a model with position embeddings for one image size
            own = (int(getattr(config, "num_channels", 3)), size, size)
            if shape is not None and shape != own:
                raise ConfigError(
                    f"{name}: {self.model_name!r} takes images of shape {list(own)}, not input_dim {list(shape)}; "
                    "resize the data with a transform or leave input_dim out"
                )
            return own
        return shape

    def _measure_features(self) -> int:
        size = self.input_dim or (int(getattr(self.backbone.config, "num_channels", 3)), 64, 64)
        with torch.no_grad():
            return int(self._features(torch.zeros(1, *size)).shape[-1])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled.flatten(1)  # (B, hidden); ResNet's is (B, hidden, 1, 1)
        if self.pooling == "pooler":
            raise ConfigError(f"{type(self).__name__}: {self.model_name!r} has no pooled output; use pooling: auto")
        hidden = out.last_hidden_state
        if hidden.dim() == 3:  # (B, tokens, hidden)
            return hidden[:, 0] if self.pooling in ("auto", "cls") else hidden.mean(dim=1)
        return hidden.flatten(2).mean(dim=-1)  # (B, hidden, H, W) -> (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self._features(x))  # (B, output_dim)


class HuggingFaceResNetEncoder(HuggingFaceEncoder):
    """A Hugging Face ResNet (or any vision backbone with a pooled output): upstream Spherinator's class and arguments.

    Its pooled output (B, hidden_sizes[-1]) is projected to ``output_dim`` when that differs from the feature size.
    Attribute ``resnet`` is the backbone; ``example_input_array`` a (1, 3, 128, 128) batch, as upstream has them.

    Args:
        model_name: Hub id (needs the local Hugging Face cache or the hub) or a ``save_pretrained`` directory.
        output_dim: Size of the output; None (or the feature size) keeps the pooled features unprojected.
        freeze: Fix the backbone's weights (the projection stays trainable).
        weights: Start the whole encoder from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider``.
    """

    _backbone_attr = "resnet"  # upstream's name, so that its state dicts load as they are

    def __init__(
        self,
        model_name: str = "microsoft/resnet-18",
        output_dim: int | None = None,
        freeze: bool = False,
        weights: str | WeightsProvider | None = None,
    ) -> None:
        super().__init__(model_name, output_dim=output_dim, freeze=freeze, weights=None, pooling="pooler")
        hidden = self.projection.in_features if isinstance(self.projection, nn.Linear) else self.output_dim
        if self.output_dim == hidden:  # upstream projects only to another size: its checkpoints have no projection
            self.projection = nn.Identity()
        self.example_input_array = torch.randn(1, 3, 128, 128)
        apply_transfer(self, weights, False)
