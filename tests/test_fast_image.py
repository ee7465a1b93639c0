"""The tensor version of CLIP's validation transform against the PIL one it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from open_clip.transform import image_transform
from PIL import Image

from flamingo_cli.data import fast_image
from flamingo_cli.data.fast_image import tensor_transform

# one uint8 level after normalisation, for the smallest std of CLIP's statistics
ONE_LEVEL = 1 / 255 / 0.2613


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: the kind of content where resize filters differ most."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], -1)
    pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def test_recognises_only_the_clip_validation_pipeline() -> None:
    fast = tensor_transform(image_transform(224, is_train=False))
    assert fast is not None and fast.size == 224 and fast.crop == (224, 224)
    assert fast.interpolation is T.InterpolationMode.BICUBIC
    assert tensor_transform(image_transform(224, is_train=True)) is None  # random crops
    assert tensor_transform(T.Compose([T.Resize(224), T.ToTensor()])) is None
    assert tensor_transform(lambda image: torch.zeros(3, 2, 2)) is None
    with_max = T.Compose(
        [
            T.Resize(224, max_size=300),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([0] * 3, [1] * 3),
        ]
    )
    assert tensor_transform(with_max) is None


@pytest.mark.parametrize(("width", "height"), [(640, 480), (300, 500), (224, 224), (230, 1000)])
def test_matches_the_pil_transform_to_about_one_level(width: int, height: int) -> None:
    reference = image_transform(224, is_train=False)
    fast = tensor_transform(reference)
    assert fast is not None
    image = _photo(width, height)
    expected = reference(image)
    out = fast(image)
    assert out.shape == expected.shape == (3, 224, 224) and out.dtype == torch.float32
    levels = (out - expected).abs() / ONE_LEVEL
    # the two filters round their intermediate pass differently: at most a few pixels of a
    # strongly downscaled noisy image move by more than one level
    assert levels.mean() < 0.5
    assert (levels > 1.01).float().mean() < 0.01
    assert levels.max() < 6
    assert torch.equal(fast(image, flip=True), out.flip(-1))


def test_pixels_without_the_arrow_export_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = tensor_transform(image_transform(64, is_train=False))
    assert fast is not None
    image = _photo(120, 90, seed=3)
    shared = fast(image)

    def no_export(obj: object) -> object:
        raise TypeError("no Arrow export in this Pillow")

    monkeypatch.setattr(fast_image.pa, "array", no_export)
    assert fast_image._pixels(image).shape == (3, 90, 120)
    assert torch.equal(fast(image), shared)


@pytest.mark.parametrize(("width", "height"), [(1, 1), (3, 700), (2600, 2600)])
def test_pixels_hold_the_image_at_any_size(width: int, height: int) -> None:
    # Pillow shares single-block images through Arrow; larger ones span blocks and are copied
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = fast_image._pixels(Image.fromarray(pixels))
    assert out.dtype == torch.uint8 and out.shape[1:] == (height, width)
    assert torch.equal(out[:3].permute(1, 2, 0), torch.from_numpy(pixels))
