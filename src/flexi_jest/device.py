"""Where tensors run: device choice, model input conversion, mixed precision."""

import torch
from torch import Tensor


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; an explicit cuda device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def to_model_input(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images [B, 3, H, W] -> float [B, 3, H, W] in [-1, 1] on device. To a GPU the uint8 batch
    (4x smaller than floats) is copied from pinned memory, asynchronously, and converted there."""
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
