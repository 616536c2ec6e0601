"""Selection cost next to training cost: is joint selection cheap enough to be free?

For super-batches B from 1,280 to 40,960 (filter 0.8, 16 chunks) it times, on random unit embeddings:
  - matrix path:     score_matrix (the [B, B] learnability matrix) then joint_select on it
  - embedding path:  joint_select_from_embeddings, what training uses: the same draws, scores computed
                     only where Algorithm 1 reads them (diagonal, chosen rows and columns), no [B, B]
  - train:           one training step of the tiny model on the selected sub-batch b = 0.2 B
and prints JSON with each time and its ratio to the training step. The matrix path is skipped
where its [B, B] fp32 matrix would not fit in free memory.

    python bench/selection_speed.py                       # every size the machine holds
    python bench/selection_speed.py --sizes 1280 5120 --repeats 3
"""

import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F

from timing import timed  # bench/timing.py

from flexi_jest.config import MODEL_PRESETS, OptimConfig
from flexi_jest.device import resolve_device
from flexi_jest.model import DualEncoder
from flexi_jest.selection import joint_select, joint_select_from_embeddings, score_matrix
from flexi_jest.train import build_optimizer, multi_patch_loss


def unit(batch: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.randn(batch, dim, generator=generator, device=device), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1280, 2560, 5120, 10240, 20480, 40960])
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cfg = MODEL_PRESETS[args.model]
    model = DualEncoder(cfg).to(device)
    optimizer = build_optimizer(model, OptimConfig())
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for batch in args.sizes:
        n_select = round(batch * (1 - args.filter_ratio))
        learner = (unit(batch, cfg.embed_dim, generator, device), unit(batch, cfg.embed_dim, generator, device),
                   torch.tensor(2.3, device=device), torch.tensor(-10.0, device=device))
        reference = (unit(batch, cfg.embed_dim, generator, device), unit(batch, cfg.embed_dim, generator, device),
                     torch.tensor(2.3, device=device), torch.tensor(-10.0, device=device))
        row: dict = {"super_batch": batch, "sub_batch": n_select, "chunks": args.chunks}
        row["embedding_path_seconds"] = timed(
            lambda: joint_select_from_embeddings("learnability", learner, reference, n_select, args.chunks, generator),
            args.repeats, device)
        matrix_bytes = 4 * batch * batch + 4 * 4 * 4096 * batch  # fp32 [B, B] + four [4096, B] row-chunk temporaries
        available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                     else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
        if matrix_bytes < 0.8 * available:
            scores = score_matrix("learnability", learner, reference)
            row["score_matrix_seconds"] = timed(lambda: score_matrix("learnability", learner, reference), args.repeats, device)
            row["joint_select_seconds"] = timed(lambda: joint_select(scores, n_select, args.chunks, generator), args.repeats, device)
            del scores
        else:
            row["matrix_path_skipped"] = f"needs ~{matrix_bytes / 2**30:.1f} GiB, {available / 2**30:.1f} GiB free"
        images = torch.randn(n_select, 3, cfg.image_size, cfg.image_size, device=device)
        tokens = torch.randint(1, 49000, (n_select, cfg.context_length), device=device)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            multi_patch_loss(model, images, tokens, [cfg.patch_size]).backward()
            optimizer.step()

        train = timed(train_step, max(1, args.repeats - 1), device)
        row["train_step_seconds"] = train
        row["embedding_path_over_train"] = row["embedding_path_seconds"] / train
        if "joint_select_seconds" in row:
            row["joint_select_over_train"] = row["joint_select_seconds"] / train
            row["matrix_path_over_train"] = (row["score_matrix_seconds"] + row["joint_select_seconds"]) / train
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({
        "benchmark": "selection_speed", "device": str(device), "model": args.model,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "filter_ratio": args.filter_ratio, "results": rows,
        "embedding_path_under_5_percent_everywhere": all(r["embedding_path_over_train"] < 0.05 for r in rows),
    }, indent=1))


if __name__ == "__main__":
    main()
