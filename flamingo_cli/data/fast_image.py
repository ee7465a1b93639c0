"""The CLIP validation transform (resize, center crop, normalise) on torch's uint8 kernels.

OpenFlamingo resizes with PIL. torch's antialiased uint8 resize computes the same filter
several times faster; the pixels differ by rounding (nearly all within one level in 255). Only a
transform recognised as exactly that pipeline is replaced; any other runs as given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

_MODES = (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR)


@dataclass(frozen=True)
class TensorTransform:
    """Resize the shorter side to `size`, crop `crop` (H, W) from the centre, normalise."""

    size: int
    crop: tuple[int, int]
    interpolation: T.InterpolationMode
    offset: torch.Tensor  # mean * 255, (3, 1, 1)
    scale: torch.Tensor  # 1 / (std * 255), (3, 1, 1)

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        """An RGB PIL image -> (3, H, W) float tensor, as the PIL pipeline would return;
        mirrored left-right when `flip`."""
        pixels = TF.resize(
            _pixels(image), [self.size], interpolation=self.interpolation, antialias=True
        )
        pixels = TF.center_crop(pixels, list(self.crop))[:3].contiguous()
        if flip:  # on the contiguous copy: flipping the strided view would cost twice as much
            pixels = pixels.flip(-1)
        out: torch.Tensor = pixels.float().sub_(self.offset).mul_(self.scale)
        return out


def _pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as (C, H, W) uint8 in channels-last memory, which the resize reads directly.

    Pillow (11.2 and later) shares its RGBX pixel memory through the Arrow C interface: four
    channels, no copy. Otherwise the three channels are copied out.
    """
    width, height = image.size
    try:
        exported = pa.array(image)
        data = exported.buffers()[-1]
        if data is not None and exported.offset == 0 and data.size >= width * height * 4:
            flat = np.frombuffer(data, dtype=np.uint8, count=width * height * 4)
            with warnings.catch_warnings():  # read-only memory: nothing here writes to it
                warnings.simplefilter("ignore", UserWarning)
                shared = torch.from_numpy(flat)
            return shared.view(height, width, 4).permute(2, 0, 1)
    except (pa.ArrowException, TypeError, ValueError, AttributeError):
        pass
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _is_rgb_conversion(step: Any) -> bool:
    """open_clip converts to RGB with a class in newer versions, a function in older ones."""
    name = getattr(step, "__name__", type(step).__name__)
    return name in ("MaybeConvertMode", "_convert_to_rgb") and getattr(step, "mode", "RGB") == "RGB"


def tensor_transform(transform: Callable[[Image.Image], torch.Tensor]) -> TensorTransform | None:
    """The tensor version of `transform` when it is Resize(shorter side) -> CenterCrop ->
    [RGB conversion] -> ToTensor -> Normalize with 3 channels; None for anything else."""
    steps = list(getattr(transform, "transforms", None) or [])
    if steps and len(steps) == 5 and _is_rgb_conversion(steps[2]):
        del steps[2]
    if len(steps) != 4:
        return None
    resize, crop, to_tensor, normalize = steps
    if not (
        type(resize) is T.Resize
        and type(crop) is T.CenterCrop
        and isinstance(to_tensor, T.ToTensor)
        and type(normalize) is T.Normalize
    ):
        return None
    size = resize.size
    if not isinstance(size, int):  # a one-element sequence means the shorter side too
        if len(size) != 1:
            return None
        size = size[0]
    if resize.max_size is not None or resize.interpolation not in _MODES:
        return None
    if resize.antialias is False or len(normalize.mean) != 3 or len(normalize.std) != 3:
        return None
    mean = torch.tensor(normalize.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(normalize.std, dtype=torch.float32).view(3, 1, 1)
    height, width = crop.size if len(crop.size) == 2 else (crop.size[0], crop.size[0])
    return TensorTransform(
        size=int(size),
        crop=(int(height), int(width)),
        interpolation=resize.interpolation,
        offset=mean * 255,
        scale=1 / (std * 255),
    )
