"""Image preprocessing on the host, as open_clip does it, with torchvision v2 transforms.

Scoring, caching and evaluation: an aspect-preserving resize of the shorter side to the model's size,
then a centre crop (a 1024x256 image keeps its middle square, it is not squashed). Training may use
a random resized crop instead (open_clip's default scale (0.9, 1.0)); it is off unless configured, so
the generated benchmark data (square images at the model's size) passes through unchanged.

Images stay uint8 [3, H, W] on the host; normalisation (the model's mean / std) happens on the device
after the copy (device.to_model_input), so a batch crosses to the device at a quarter of fp32's size.

A random crop is a pure function of (seed, sample key): decoding in any worker, on any rank, before or
after a resume, gives the same pixels.
"""

import hashlib
import io
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

Crop = Literal["center", "random_resized"]
OPEN_CLIP_SCALE = (0.9, 1.0)  # open_clip's RandomResizedCrop scale for training


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 [3, size, size]. crop 'center' (deterministic) or 'random_resized' (seeded per sample)."""

    size: int
    crop: Crop = "center"
    scale: tuple[float, float] = OPEN_CLIP_SCALE
    seed: int = 0

    def __post_init__(self) -> None:
        interpolation = InterpolationMode.BICUBIC
        if self.crop == "center":
            steps = [v2.Resize(self.size, interpolation=interpolation), v2.CenterCrop(self.size)]
        elif self.crop == "random_resized":
            steps = [v2.RandomResizedCrop(self.size, scale=self.scale, interpolation=interpolation)]
        else:
            raise ValueError(f"crop must be 'center' or 'random_resized', got {self.crop!r}")
        object.__setattr__(self, "_pipeline", v2.Compose([*steps, v2.PILToTensor()]))

    def __call__(self, image: Image.Image, key: str = "") -> Tensor:
        """image (any size, RGB) -> uint8 [3, size, size]; key seeds the random crop."""
        if self.crop == "center":
            if image.size == (self.size, self.size):
                return v2.functional.pil_to_tensor(image)
            return self._pipeline(image)
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            return self._pipeline(image)


def decode_image(data: bytes, transform: ImageTransform | None, key: str = "") -> Tensor:
    """Encoded image bytes (png / jpg / webp) -> uint8 [3, H, W]; without a transform at its own size.
    Raises whatever PIL raises for bad data (the readers count it)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        if transform is None:
            return v2.functional.pil_to_tensor(image)
        return transform(image, key)
