"""Vision Transformer encoder backed by HuggingFace transformers."""

from __future__ import annotations

import torch
from torch import nn

from spherinator.models.huggingface import load_backbone
from spherinator.models.transfer import WeightsProvider, apply_transfer


class HuggingFaceViTEncoder(nn.Module):
    """A HuggingFace ViT whose CLS token (last hidden state) is optionally projected to ``output_dim``.

    Attributes ``input_dim`` = (num_channels, image_size, image_size) and ``output_dim`` come from the ViT config.

    Args:
        model_name: Hub id (e.g. ``google/vit-base-patch16-224``, needs the hub or the local HF cache) or a local
            directory written by ``save_pretrained``; must be a ViT variant.
        output_dim: Size of a linear projection of the CLS token; None keeps the ViT's hidden size.
        freeze: Freeze the ViT backbone weights (the projection stays trainable).
        weights: Start the whole encoder from an earlier run: a checkpoint/state-dict path or a ``WeightsProvider``.
    """

    # Upstream's ViT keeps ViTModel's pooler, which its forward never calls: its weights load here without it.
    unused_weights = ("vit.pooler.",)

    def __init__(
        self,
        model_name: str = "google/vit-base-patch16-224",
        output_dim: int | None = None,
        freeze: bool = False,
        weights: str | WeightsProvider | None = None,
    ) -> None:
        super().__init__()
        from transformers import ViTModel  # heavy import, only when a ViT is used

        self.vit = load_backbone(model_name, "HuggingFaceViTEncoder", "ViT", ViTModel, add_pooling_layer=False)
        config = self.vit.config
        if getattr(config, "model_type", None) != "vit":
            raise ValueError(
                f"HuggingFaceViTEncoder: {model_name!r} is a {config.model_type!r} model, not a ViT; use a ViT variant"
            )
        self.model_name = model_name
        self.freeze = freeze
        self.input_dim = (int(config.num_channels), int(config.image_size), int(config.image_size))
        hidden = int(config.hidden_size)
        if output_dim is not None and int(output_dim) <= 0:
            raise ValueError(f"HuggingFaceViTEncoder: output_dim must be positive or null, got {output_dim!r}")
        self.output_dim = int(output_dim) if output_dim is not None else hidden
        self.projection = nn.Linear(hidden, self.output_dim) if output_dim is not None else nn.Identity()
        self.example_input_array = torch.randn(1, *self.input_dim)  # upstream's attribute, for its scripts
        apply_transfer(self, weights, freeze, frozen=self.vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.vit(pixel_values=x).last_hidden_state[:, 0]  # (B, hidden)
        return self.projection(cls)  # (B, output_dim)
