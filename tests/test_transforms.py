"""AlignByMoments on images whose centre and orientation are known."""

import math

import pytest
import torch

from spherinator.data import AlignByMoments


def blob(size: int = 48, dx: float = 0.0, dy: float = 0.0, angle: float = 0.0, ratio: float = 0.4) -> torch.Tensor:
    """An elliptical Gaussian (3, size, size) on a sky of 0.02, centred at (dx, dy) pixels from the stamp's centre,
    its major axis at ``angle`` (radians, counter-clockwise from the x axis in array coordinates); the red band is
    brighter on one side of the major axis' normal so that a half turn is told apart from a quarter turn."""
    ys, xs = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    u = (xs - dx) * math.cos(angle) + (ys - dy) * math.sin(angle)  # along the major axis
    v = -(xs - dx) * math.sin(angle) + (ys - dy) * math.cos(angle)
    light = torch.exp(-0.5 * ((u / 6.0) ** 2 + (v / (6.0 * ratio)) ** 2))
    image = torch.stack([light * 0.9, light * 0.7, light * 0.5]) + 0.02
    return image.float()


def second_moments(image: torch.Tensor) -> tuple[float, float, float, float, float]:
    light = (image.mean(0) - 0.02).clamp(min=0)
    size = image.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    total = light.sum()
    cx, cy = float((light * xs).sum() / total), float((light * ys).sum() / total)
    mxx = float((light * (xs - cx) ** 2).sum() / total)
    myy = float((light * (ys - cy) ** 2).sum() / total)
    mxy = float((light * (xs - cx) * (ys - cy)).sum() / total)
    return cx, cy, mxx, myy, mxy


@pytest.mark.parametrize("dx, dy, angle", [(5.0, -3.0, 0.7), (-4.5, 2.0, 2.2), (0.0, 0.0, -1.2), (3.0, 3.0, 1.5)])
def test_centres_and_turns_the_major_axis_horizontal(dx, dy, angle):
    image = blob(dx=dx, dy=dy, angle=angle)
    before = second_moments(image)
    assert math.hypot(before[0], before[1]) > 1 or abs(before[4]) > 1  # off centre or tilted to begin with
    cx, cy, mxx, myy, mxy = second_moments(AlignByMoments()(image))
    assert abs(cx) < 0.3 and abs(cy) < 0.3
    assert mxx > 4 * myy  # the major axis lies along x
    assert abs(mxy) < 0.05 * mxx


def test_the_same_object_anywhere_and_any_way_round_aligns_to_the_same_image():
    images = torch.stack([blob(dx=dx, dy=dy, angle=a) for dx, dy, a in [(0, 0, 0.0), (4, -2, 0.9), (-3, 5, 2.6)]])
    aligned = AlignByMoments()(images)
    reference = aligned[0]
    for other in aligned[1:]:
        # the sign of the major axis is free: compare with the image and its half turn
        error = min((other - reference).abs().max(), (other.flip(-1, -2) - reference).abs().max())
        assert error < 0.03  # interpolation, on a peak of 0.9
    unaligned_error = (images[1] - images[0]).abs().max()
    assert unaligned_error > 0.3


def test_options_batches_dtypes_and_empty_images():
    image = blob(dx=4.0, dy=-2.0, angle=0.8)
    centred_only = second_moments(AlignByMoments(rotate=False)(image))
    assert abs(centred_only[0]) < 0.3 and abs(centred_only[1]) < 0.3
    assert abs(centred_only[4]) > 1  # still tilted
    turned_only = second_moments(AlignByMoments(centre=False)(image))
    assert abs(turned_only[4]) < 0.05 * turned_only[2]
    assert torch.equal(AlignByMoments(centre=False, rotate=False)(image), image)

    batch = torch.stack([image, blob(angle=-0.5)])
    one_by_one = torch.stack([AlignByMoments()(x) for x in batch])
    assert torch.allclose(AlignByMoments()(batch), one_by_one, atol=1e-6)

    as_uint8 = (image * 255).round().to(torch.uint8)
    out = AlignByMoments()(as_uint8)
    assert out.dtype == torch.uint8
    assert (out.float() / 255 - AlignByMoments()(as_uint8.float() / 255)).abs().max() < 1.5 / 255

    sky = torch.full((3, 16, 16), 0.02)
    assert torch.allclose(AlignByMoments()(sky), sky, atol=1e-6)  # no light above the sky: left as it is


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="threshold"):
        AlignByMoments(threshold=-1)
    with pytest.raises(ValueError, match=r"got shape \(16, 16\)"):
        AlignByMoments()(torch.zeros(16, 16))


@pytest.mark.parametrize("shape", [(24, 24), (2, 64)])
def test_a_column_it_cannot_align_is_refused_with_its_shape(tmp_path, shape):
    # (before: a batch (B, H, W) of grey images or (B, C, L) of spectra was aligned as one (C, H, W) image)
    import numpy as np

    from spherinator.data import Column, DataError, DataModule, write_dataset

    write_dataset(tmp_path, [{"data": np.random.default_rng(0).random((8, *shape), dtype=np.float32)}])
    for per_sample in (False, True):
        column = Column("data", transform=AlignByMoments(), per_sample=per_sample)
        dm = DataModule(tmp_path, columns=[column], batch_size=4, val_fraction=0.0)
        with pytest.raises(DataError, match=rf"column 'data' holds samples of shape \({shape[0]}, {shape[1]}\), but "
                                            r"its transform AlignByMoments takes samples \(C, H, W\)"):  # fmt: skip
            dm.setup()
    grey = tmp_path / "grey"
    write_dataset(grey, [{"data": np.zeros((8, 1, 24, 24), dtype=np.float32)}])
    dm = DataModule(grey, columns=[Column("data", transform=AlignByMoments())], batch_size=4, val_fraction=0.0)
    assert next(iter(dm.train_dataloader())).shape == (4, 1, 24, 24)  # (1, H, W) is fine


@pytest.mark.parametrize("scale", [1e36, 1e-38])
def test_alignment_does_not_depend_on_the_images_scale(scale):
    # (before: at 1e36 the squared offsets overflowed float32: a finite but wrongly moved image, 3e38 made NaN)
    images = torch.stack([blob(dx=5.0, dy=-3.0, angle=0.7), blob(dx=-4.0, angle=-0.3)])  # (2, 1, 48, 48)
    align = AlignByMoments()
    expected = align(images)
    scaled = align(images * scale)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled / scale, expected, atol=1e-4, rtol=1e-4)
    unit, top = images / images.amax(), 0.99 * torch.finfo(torch.float32).max  # the largest values a column may hold
    torch.testing.assert_close(align(unit * top) / top, align(unit), atol=1e-4, rtol=1e-4)


def test_an_empty_batch_is_returned_as_it_is():
    # (before: affine_grid's ValueError "Expected non-zero, positive output size")
    assert AlignByMoments()(torch.zeros(0, 3, 8, 8)).shape == (0, 3, 8, 8)


# -- per-sample random transforms, per-sample normalisation ------------------------------------------------------------


def test_random_torchvision_transforms_are_told_from_deterministic_ones():
    import torchvision.transforms as v1
    import torchvision.transforms.v2 as v2

    from spherinator.data.transforms import draws_random

    random = [v2.RandomRotation(10), v2.RandomHorizontalFlip(), v2.ColorJitter(0.1), v1.RandomRotation(5)]
    random += [v2.Compose([v2.Resize(8), v2.RandomVerticalFlip()]), v2.RandomApply([v2.Resize(8)])]
    assert all(draws_random(t) for t in random)
    deterministic = [v2.Resize(8), v2.Normalize([0.5], [0.5]), v2.Compose([v2.CenterCrop(4)]), AlignByMoments()]
    assert not any(draws_random(t) for t in deterministic)


def test_column_draws_random_transforms_per_sample_by_default():
    import torchvision.transforms.v2 as v2

    from spherinator.data import Column

    assert Column("data", v2.RandomRotation(180)).per_sample is True
    assert Column("data", v2.Compose([v2.RandomHorizontalFlip(), v2.RandomRotation(180)])).per_sample is True
    assert Column("data", v2.Resize(8)).per_sample is False  # deterministic: one call per batch, faster
    assert Column("data", AlignByMoments()).per_sample is False
    assert Column("data").per_sample is False
    assert Column("data", v2.RandomRotation(180), per_sample=False).per_sample is False  # asked for: kept


def test_two_samples_of_one_batch_get_different_draws(tmp_path):
    """Upstream draws a random transform per sample; so does a column by default now (it drew once per batch)."""
    import numpy as np
    import torchvision.transforms.v2 as v2

    from spherinator.data import DataModule, write_dataset

    image = np.zeros((1, 6, 6), dtype=np.uint8)
    image[0, :, 0] = 255  # a bright left edge: flipped, it is on the right
    write_dataset(tmp_path, [{"data": np.repeat(image[None], 64, axis=0)}], rows_per_group=64)
    torch.manual_seed(0)
    column = {"name": "data", "transform": v2.RandomHorizontalFlip()}
    dm = DataModule(tmp_path, columns=[column], batch_size=64, val_fraction=0.0, shuffle=False, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    left = batch[:, 0, :, 0].sum(1) > 0
    assert 0 < int(left.sum()) < 64, "every sample of the batch got the same flip"


def test_minmax_and_absmax_normalise_each_sample_over_all_its_values():
    from spherinator.data import AbsMaxNormalize, MinMaxNormalize

    x = torch.tensor([[[-1.2, 3.9, -0.5]], [[1.7, -8.2, -0.4]], [[2.0, 2.0, 2.0]]])
    absmax = AbsMaxNormalize()(x)
    assert torch.allclose(absmax[:2, 0], torch.tensor([[-0.3077, 1.0, -0.1282], [0.2073, -1.0, -0.0488]]), atol=1e-3)
    minmax = MinMaxNormalize()(x)
    assert torch.allclose(minmax[0, 0], (x[0, 0] + 1.2) / 5.1) and minmax[1].min() == 0 and minmax[1].max() == 1
    assert torch.equal(minmax[2], torch.zeros(1, 3))  # a constant sample: zeros, not NaN


def test_batch_normalisers_refuse_per_sample():
    from spherinator.data import Column, DataError, MinMaxNormalize

    assert Column("flux", MinMaxNormalize()).per_sample is False
    with pytest.raises(DataError, match="remove `per_sample: true`"):
        Column("flux", MinMaxNormalize(), per_sample=True)


@pytest.mark.parametrize("wrap", ["compose", "random_apply", "sequential"])
def test_a_random_transform_composed_with_a_batch_normaliser_is_refused_not_applied_per_row(wrap):
    import torchvision.transforms.v2 as v2

    from spherinator.data import Column, DataError, MinMaxNormalize
    from spherinator.data.datamodule import apply_transform

    flip = v2.RandomHorizontalFlip(p=0.0)
    transform = {
        "compose": v2.Compose([flip, MinMaxNormalize()]),
        "random_apply": v2.RandomApply([MinMaxNormalize()], p=1.0),
        "sequential": torch.nn.Sequential(flip, MinMaxNormalize()),
    }[wrap]
    # per sample, MinMaxNormalize took each channel of one sample for a sample of its own (all zeros)
    with pytest.raises(DataError, match="write `per_sample: false`"):
        Column("data", transform)
    with pytest.raises(DataError, match="remove `per_sample: true`"):
        Column("data", transform, per_sample=True)
    column = Column("data", transform, per_sample=False)  # asked for: one draw per batch, each sample normalised whole
    x = torch.tensor([1.0, 3.0, 5.0, 7.0]).reshape(1, 4, 1, 1).expand(2, 4, 1, 2)
    out = apply_transform(column.transform, x, column.per_sample, "data")
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
