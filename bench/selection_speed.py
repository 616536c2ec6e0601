"""Selection cost next to training cost, and against the machine's own matmul peak.

For each model preset (default: small, then tiny for information) and super-batch B from 1,280 to 40,960
(filter 0.8, 16 chunks) it times, on random unit embeddings of the preset's embedding size:
  - embedding path:  joint_select_from_embeddings (learnability), what training uses: Algorithm 1 with the
                     scores computed only where it reads them (diagonal, chosen rows and columns), no [B, B]
  - matrix path:     score_matrix (the [B, B] matrix) then joint_select on it, up to --matrix-max
  - train:           one training step of the preset on the selected sub-batch b = 0.2 B (random images and
                     tokens). Up to --max-train-batch it is measured; beyond, where a step's activations would
                     not fit this machine, it is the largest measured step's seconds per pair times b, marked
                     "train_step_extrapolated" (a step's FLOPs are linear in b up to the small b x b loss)
and, once, the machine's fp32 matmul peak: the best of --gemm-repeats [N, N] @ [N, N] products (N = --gemm-size).
Each size reports the embedding path's FLOPs (selection_flops below: matmuls, the fused scale and bias,
softplus, the score difference and the sums, the Gumbel draws), its achieved FLOP/s and that as a fraction of
the measured peak, and its time as a fraction of the training step (the target: under 5 % for small).

    python bench/selection_speed.py                                  # small and tiny, every size
    python bench/selection_speed.py --models tiny --sizes 1280 5120 --repeats 3

Prints one JSON line per size as it goes, then the whole report.
"""

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from timing import timed  # bench/timing.py

from flexi_jest.config import MODEL_PRESETS, OptimConfig
from flexi_jest.device import resolve_device
from flexi_jest.flops import training_step_flops
from flexi_jest.losses import multi_patch_loss
from flexi_jest.models import DualEncoder
from flexi_jest.selection import chunk_sizes, joint_select, joint_select_from_embeddings, score_matrix
from flexi_jest.train import build_optimizer

SOFTPLUS_FLOPS = 3  # per element: exp, add, log (log1p(exp(x))); counted as one FLOP each
GUMBEL_FLOPS = 4  # per element and chunk: two logs, a negation, the add to the logits


def selection_flops(batch: int, n_select: int, n_chunks: int, dims: list[int]) -> int:
    """FLOPs of joint_select_from_embeddings for a two-model score (learnability: dims = [learner d, reference d]).

    Algorithm 1 reads, per chunk of c chosen examples, the scores of the [B, c] column block and the [c, B] row
    block: 2 B n_select pair scores in all. Each pair, per model: the dot product (2 d), the temperature and bias
    fused into addmm (2), softplus (SOFTPLUS_FLOPS) and the running sum (1). Per chunk and example: the two
    blocks' sums and the models' difference (3), the add to the interaction (1), the Gumbel draw and the
    conditional score's add (GUMBEL_FLOPS + 1). Own scores: B matched pairs per model (2 d + 2 + softplus) and the
    difference. top-k and masking are not counted."""
    pairs = 2 * batch * n_select
    per_pair = sum(2 * d + 2 + SOFTPLUS_FLOPS + 1 for d in dims)
    own = batch * (sum(2 * d + 2 + SOFTPLUS_FLOPS for d in dims) + 1)
    per_chunk = batch * (3 + 1 + GUMBEL_FLOPS + 1)
    return pairs * per_pair + own + len(chunk_sizes(n_select, n_chunks)) * per_chunk


def unit(batch: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, generator=generator, device=device), dim=-1)


def matmul_peak(size: int, repeats: int, device: torch.device) -> dict:
    """The best fp32 FLOP/s of [size, size] @ [size, size] over `repeats` products (after one warm-up)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    torch.matmul(a, b)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"gemm_size": size, "seconds": best, "flops_per_second": 2 * size ** 3 / best}


def measure_preset(preset: str, args: argparse.Namespace, device: torch.device, peak: float) -> list[dict]:
    cfg = MODEL_PRESETS[preset]
    model = DualEncoder(cfg).to(device)
    optimizer = build_optimizer(model, OptimConfig())
    generator = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []
    measured_per_pair = None  # seconds per trained pair of the largest measured training step
    for batch in args.sizes:
        n_select = round(batch * (1 - args.filter_ratio))
        learner = (unit(batch, cfg.embed_dim, generator, device), unit(batch, cfg.embed_dim, generator, device),
                   torch.tensor(2.3, device=device), torch.tensor(-10.0, device=device))
        reference = (unit(batch, cfg.embed_dim, generator, device), unit(batch, cfg.embed_dim, generator, device),
                     torch.tensor(2.3, device=device), torch.tensor(-10.0, device=device))
        row: dict = {"model": preset, "super_batch": batch, "sub_batch": n_select, "chunks": args.chunks}
        seconds = timed(
            lambda: joint_select_from_embeddings("learnability", learner, reference, n_select, args.chunks, generator),
            args.repeats, device)
        work = selection_flops(batch, n_select, args.chunks, [cfg.embed_dim, cfg.embed_dim])
        row.update(embedding_path_seconds=seconds, embedding_path_flops=work,
                   embedding_path_flops_per_second=work / seconds,
                   embedding_path_fraction_of_peak=work / seconds / peak)
        matrix_bytes = 4 * batch * batch + 4 * 4 * 4096 * batch  # fp32 [B, B] + four [4096, B] row-chunk temporaries
        available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                     else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        if batch <= args.matrix_max and matrix_bytes < 0.5 * available:
            scores = score_matrix("learnability", learner, reference)
            row["score_matrix_seconds"] = timed(lambda: score_matrix("learnability", learner, reference), args.repeats,
                                                device)
            row["joint_select_seconds"] = timed(lambda: joint_select(scores, n_select, args.chunks, generator),
                                                args.repeats, device)
            del scores
        else:
            row["matrix_path_skipped"] = (f"B > --matrix-max {args.matrix_max}" if batch > args.matrix_max else
                                          f"needs ~{matrix_bytes / 2**30:.1f} GiB, {available / 2**30:.1f} GiB free")
        train_flops = training_step_flops(cfg, n_select, [cfg.patch_size])
        row["train_step_flops"] = train_flops
        if n_select <= args.max_train_batch:
            images = torch.randn(n_select, 3, cfg.image_size, cfg.image_size, device=device)
            tokens = torch.randint(1, 49000, (n_select, cfg.context_length), device=device)

            def train_step() -> None:
                optimizer.zero_grad(set_to_none=True)
                multi_patch_loss(model, images, tokens, [cfg.patch_size]).backward()
                optimizer.step()

            train = timed(train_step, max(1, args.repeats - 1), device)
            measured_per_pair = train / n_select
            row["train_step_extrapolated"] = False
            del images, tokens
        else:
            if measured_per_pair is None:
                raise SystemExit(f"--max-train-batch {args.max_train_batch} is below the first sub-batch {n_select}: "
                                 "nothing measured to extrapolate from")
            train = measured_per_pair * n_select
            row["train_step_extrapolated"] = True
        row.update(train_step_seconds=train, train_step_flops_per_second=train_flops / train,
                   embedding_path_over_train=seconds / train)
        if "joint_select_seconds" in row:
            row["matrix_path_over_train"] = (row["score_matrix_seconds"] + row["joint_select_seconds"]) / train
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["small", "tiny"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1280, 2560, 5120, 10240, 20480, 40960])
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-train-batch", type=int, default=1024,
                        help="sub-batches above this are not trained here (activations); their step is extrapolated")
    parser.add_argument("--matrix-max", type=int, default=10240, help="the [B, B] matrix path up to this B")
    parser.add_argument("--gemm-size", type=int, default=4096)
    parser.add_argument("--gemm-repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    started = time.perf_counter()
    load_before = os.getloadavg()
    peak = matmul_peak(args.gemm_size, args.gemm_repeats, device)
    print(json.dumps({"matmul_peak": peak}), flush=True)
    results = {preset: measure_preset(preset, args, device, peak["flops_per_second"]) for preset in args.models}
    print(json.dumps({
        "benchmark": "selection_speed", "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "filter_ratio": args.filter_ratio, "matmul_peak": peak,
        "flop_accounting": {"softplus_per_element": SOFTPLUS_FLOPS, "gumbel_per_element": GUMBEL_FLOPS,
                            "see": "selection_flops in bench/selection_speed.py"},
        "results": results,
        "embedding_path_under_5_percent_of_training": {
            preset: all(r["embedding_path_over_train"] < 0.05 for r in rows) for preset, rows in results.items()},
        "seconds": time.perf_counter() - started,
    }, indent=1))


if __name__ == "__main__":
    main()
