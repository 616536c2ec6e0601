"""Wall-clock timing shared by the benchmarks: median seconds, synchronised on CUDA."""

import statistics
import time

import torch


def timed(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` calls, after `warmup` untimed calls (allocator, kernels,
    torch.compile); on CUDA each call is bracketed by a synchronize so the GPU work is counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
