"""Column transforms for images of objects: put each object in the same place and orientation before training.

A per-pixel reconstruction loss spends the few degrees of freedom of a spherical latent space on whatever moves the
most pixels. For cutouts of galaxies (or cells, or particles) that is where in the stamp the object sits and which
way it points, not what it is. :class:`AlignByMoments` removes both: it shifts each image so that the light's
centroid is the stamp's centre and rotates it so that the major axis of the light (second moments) is horizontal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

_MAD_TO_SIGMA = 1.4826  # median absolute deviation of a Gaussian, in sigmas


class AlignByMoments(nn.Module):
    """Centre each image on its light and turn its major axis horizontal, from the image moments.

    The light of an image is the mean over its channels minus the sky level, which is the median of the stamp's
    border pixels. The moments weigh each pixel by its light above ``threshold`` sigmas of the border's noise
    (pixels below count as sky). The centroid (first moments) of the light is moved to the stamp's centre and the
    image is rotated by the position angle of the second moments, bilinearly, repeating the border where the stamp
    runs out. The light of a round object has no major axis: it keeps its orientation. The sign of the axis is a
    free choice (a galaxy turned by 180 degrees is the same galaxy), so aligned images may still differ by a half
    turn.

    Works on one image ``(C, H, W)`` or a batch ``(B, C, H, W)`` (a ``Column`` transform gets whole batches), in
    the input's dtype and device. A 3-d input is one image: as a column transform, a column of other than
    ``(C, H, W)`` samples (grey images stored as ``(H, W)``, spectra) is refused; store grey images as
    ``(1, H, W)``. An image with no pixel above the threshold keeps its place and orientation; one of noise only is
    moved by its brightest noise.

    Args:
        centre: Shift the light's centroid to the centre of the stamp.
        rotate: Turn the major axis of the light horizontal.
        threshold: Pixels brighter than the sky by this many sigmas of the border's noise carry the moments.
    """

    # One sample's dimensions: a DataModule refuses a column whose samples have others (a batch of (H, W) grey
    # images or (C, L) spectra would be aligned as one image).
    sample_layout = ("C", "H", "W")

    def __init__(self, centre: bool = True, rotate: bool = True, threshold: float = 2.0) -> None:
        super().__init__()
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"AlignByMoments: threshold must be a finite number >= 0 (sigmas), got {threshold}")
        self.centre = bool(centre)
        self.rotate = bool(rotate)
        self.threshold = float(threshold)

    def extra_repr(self) -> str:
        return f"centre={self.centre}, rotate={self.rotate}, threshold={self.threshold:g}"

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centroid ``(cx, cy)`` in pixels from the stamp's centre and the major axis' angle from the x axis (radians,
        counter-clockwise in array coordinates) of each image of a batch ``(B, C, H, W)``; each ``(B,)``."""
        # Moments do not change with the images' scale: taken on each image divided by its largest value, they
        # neither overflow float32 (values near 3e38, whose squared offsets summed are inf) nor underflow it.
        x = x.float()
        scale = x.abs().amax(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        light = (x / torch.where(scale > 0, scale, torch.ones_like(scale))).mean(1)  # (B, H, W)
        border = torch.cat([light[:, 0], light[:, -1], light[:, 1:-1, 0], light[:, 1:-1, -1]], dim=1)  # (B, P)
        sky = border.median(dim=1).values  # (B,)
        noise = (border - sky[:, None]).abs().median(dim=1).values * _MAD_TO_SIGMA
        weight = (light - (sky + self.threshold * noise)[:, None, None]).clamp(min=0)  # (B, H, W)
        total = weight.sum((1, 2))
        empty = total <= 0
        total = torch.where(empty, torch.ones_like(total), total)
        height, width = light.shape[-2:]
        ys = torch.arange(height, device=x.device, dtype=torch.float32) - (height - 1) / 2
        xs = torch.arange(width, device=x.device, dtype=torch.float32) - (width - 1) / 2
        cy = (weight.sum(2) * ys).sum(1) / total
        cx = (weight.sum(1) * xs).sum(1) / total
        dy = ys[None, :, None] - cy[:, None, None]  # (B, H, 1)
        dx = xs[None, None, :] - cx[:, None, None]  # (B, 1, W)
        mxx = (weight * dx * dx).sum((1, 2)) / total
        myy = (weight * dy * dy).sum((1, 2)) / total
        mxy = (weight * dx * dy).sum((1, 2)) / total
        angle = 0.5 * torch.atan2(2 * mxy, mxx - myy)
        zero = torch.zeros_like(cx)
        # an image without light above the sky keeps its place and orientation
        return torch.where(empty, zero, cx), torch.where(empty, zero, cy), torch.where(empty, zero, angle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self.forward(x[None])[0]
        if x.dim() != 4:
            raise ValueError(
                f"AlignByMoments takes images (C, H, W) or batches (B, C, H, W), got shape {tuple(x.shape)}"
            )
        if not (self.centre or self.rotate) or not len(x):  # nothing to move, or no image
            return x
        height, width = x.shape[-2:]
        if height < 3 or width < 3:
            raise ValueError(f"AlignByMoments needs images of at least 3x3 pixels, got {height}x{width}")
        cx, cy, angle = self.moments(x)
        if not self.centre:
            cx, cy = torch.zeros_like(cx), torch.zeros_like(cy)
        if not self.rotate:
            angle = torch.zeros_like(angle)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # affine_grid maps output pixels (normalised to [-1, 1] per axis) to the input pixels they sample: the output
        # pixel at offset (u, v) from the centre samples the input at centroid + R(angle) (u, v)
        sx, sy = (width - 1) / 2, (height - 1) / 2
        theta = torch.stack(
            [
                torch.stack([cos, -sin * sy / sx, cx / sx], dim=1),
                torch.stack([sin * sx / sy, cos, cy / sy], dim=1),
            ],
            dim=1,
        )  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        source = x if x.is_floating_point() else x.float()
        out = F.grid_sample(source, grid.to(source.dtype), mode="bilinear", padding_mode="border", align_corners=True)
        return out if x.is_floating_point() else out.round().clamp(0, 255).to(x.dtype)


# -- which transforms draw random parameters ---------------------------------------------------------------------------

# torchvision transforms that draw their parameters at every call without "Random" in their name.
_RANDOM_NAMES = frozenset(
    {
        "AugMix",
        "AutoAugment",
        "ColorJitter",
        "ElasticTransform",
        "GaussianBlur",
        "GaussianNoise",
        "JPEG",
        "RandAugment",
        "ScaleJitter",
        "TrivialAugmentWide",
    }
)


def draws_random(transform: object) -> bool:
    """Whether ``transform`` draws random parameters at each call (a torchvision ``Random*`` transform, one of the
    other random ones such as ``ColorJitter``, or a composition holding one).

    A column whose transform draws at random is applied per sample by default, as torchvision's transforms are
    applied to each sample of a ``Dataset`` (one angle per sample, not one per batch).
    """
    return _holds(
        transform, lambda node: type(node).__name__.startswith("Random") or type(node).__name__ in _RANDOM_NAMES
    )


def holds_batch_only(transform: object) -> bool:
    """Whether ``transform`` is, or is a composition holding, a transform that only works on whole batches
    (``batch_only``, e.g. :class:`MinMaxNormalize`: given one sample it would normalise each of its rows)."""
    return _holds(transform, lambda node: getattr(node, "batch_only", False))


def _holds(transform: object, test: Callable[[object], bool]) -> bool:
    """Whether ``transform`` or any transform it composes (torchvision v1/v2 ``transforms``, module children)
    passes ``test``."""
    seen: set[int] = set()

    def walk(node: object) -> bool:
        if id(node) in seen:
            return False
        seen.add(id(node))
        if test(node):
            return True
        inner = getattr(node, "transforms", None)  # Compose, RandomApply/Choice/Order (torchvision v1 and v2)
        children = list(inner) if isinstance(inner, list | tuple | nn.ModuleList) else []
        if isinstance(node, nn.Module):
            children += list(node.children())
        return any(walk(child) for child in children)

    return walk(transform)


class _PerSampleNormalize(nn.Module):
    """Normalises each sample of a batch ``(B, ...)`` over all its values (a batch transform: the DataModule hands
    it whole batches, and refuses ``per_sample: true`` with it, where it would normalise each row of one sample)."""

    batch_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} takes a batch (B, ...), got shape {tuple(x.shape)}")
        x = x if x.is_floating_point() else x.float()
        flat = x.reshape(len(x), -1)
        return self.normalize(flat).reshape(x.shape)

    def normalize(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MinMaxNormalize(_PerSampleNormalize):
    """Scale each sample to [0, 1]: ``(x - min) / (max - min)`` over all of its values (upstream Spherinator's
    ``normalize: minmax``). A constant sample becomes zeros."""

    def normalize(self, flat: torch.Tensor) -> torch.Tensor:
        low = flat.amin(1, keepdim=True)
        span = flat.amax(1, keepdim=True) - low
        return (flat - low) / torch.where(span > 0, span, torch.ones_like(span))


class AbsMaxNormalize(_PerSampleNormalize):
    """Divide each sample by its largest absolute value, to [-1, 1] (upstream Spherinator's ``normalize: absmax``).
    An all-zero sample stays zeros."""

    def normalize(self, flat: torch.Tensor) -> torch.Tensor:
        peak = flat.abs().amax(1, keepdim=True)
        return flat / torch.where(peak > 0, peak, torch.ones_like(peak))
