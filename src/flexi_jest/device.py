"""Where tensors run: device choice, CPU threads, model input conversion, mixed precision."""

import os
from typing import Literal, Sequence

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


SHARED_CPU_ENV = "FLEXI_JEST_SHARED_CPU_TASKS"


def share_cpu_threads(env: dict[str, str] | None = None) -> int:
    """Take this process's share of the machine's cores when several training processes run side by side on it
    (KFP local execution runs a ParallelFor's baselines at once): with FLEXI_JEST_SHARED_CPU_TASKS=N set, torch
    uses max(1, cores // N) threads instead of every core in each process (N processes x all cores
    oversubscribe the CPU and each waits on the others). Unset (a pod on a cluster, a GPU run): nothing
    changes. Returns the thread count torch uses."""
    value = (os.environ if env is None else env).get(SHARED_CPU_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{SHARED_CPU_ENV}={value!r}: expected the number of processes sharing the CPU (>= 1)")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(value)))
    return torch.get_num_threads()


HALF_RANGE = (0.5, 0.5, 0.5)  # mean = std = 0.5: pixels to [-1, 1] (SigLIP, the project's configs)


def to_model_input(images: Tensor, device: torch.device, mean: Sequence[float] = HALF_RANGE,
                   std: Sequence[float] = HALF_RANGE) -> Tensor:
    """uint8 images [B, 3, H, W] -> float [B, 3, H, W] normalised, (x / 255 - mean) / std per channel (the
    model config's mean and std), on device. To a GPU the uint8 batch (4x smaller than floats) is copied
    from pinned memory, asynchronously, and converted there."""
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
    images = images.to(device, non_blocking=True).float()
    if tuple(mean) == HALF_RANGE and tuple(std) == HALF_RANGE:
        return images.div_(127.5).sub_(1.0)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return images.div_(255.0).sub_(mean_t).div_(std_t)


Precision = Literal["fp32", "amp", "bf16"]


def autocast(device: torch.device, precision: Precision = "amp"):
    """The forward's mixed precision (open_clip's names): 'fp32' none; 'amp' bf16 autocast on CUDA and
    none on the CPU (where it is slower than fp32); 'bf16' bf16 autocast on every device. Weights stay fp32."""
    enabled = precision == "bf16" or (precision == "amp" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
