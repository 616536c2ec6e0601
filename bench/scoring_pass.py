"""The learner's scoring pass: does it run as cheaply as it can, and what does it cost next to training?

A JEST step scores its whole super-batch B with the learner (a forward of both towers, no gradient) before it
trains on the chosen sub-batch b = B (1 - filter_ratio). On the FLOP count that pass is B / (3 b) of the
training step: 5/3 at filter 80 %, so a JEST step is 2.67x an IID step (docs/method.md). This benchmark measures
the pass as flexi_jest.train runs it (torch.no_grad, the scoring patch, the precision's autocast) against the
ways it could run, on random images and tokens of the preset's shapes:

    autograd        the same forward with gradients recorded (what a scoring pass without no_grad would pay)
    no_grad         what train_learner runs (fp32 on the CPU: precision "amp" is fp32 there)
    inference_mode  torch.inference_mode instead of no_grad
    bf16            no_grad under bf16 autocast (precision "bf16")
    patch P         no_grad at each scoring patch P (Flexi-JEST scores at the coarser patch)

and one training step on b pairs at the training patches (AdamW, the sigmoid loss), so that each variant's
seconds come with its share of a JEST step and the measured JEST-to-IID step ratio beside the FLOP ratio.

    python bench/scoring_pass.py                          # tiny, B = 640 (the regime's), 2 threads
    python bench/scoring_pass.py --models tiny small --super-batch 640 --repeats 5

Prints one JSON object.
"""

import argparse
import json
import os
import platform

import torch
from timing import timed  # bench/timing.py

from flexi_jest import flops
from flexi_jest.config import MODEL_PRESETS, OptimConfig
from flexi_jest.device import autocast, resolve_device
from flexi_jest.losses import multi_patch_loss
from flexi_jest.models import DualEncoder
from flexi_jest.train import build_optimizer


def measure(preset: str, super_batch: int, filter_ratio: float, repeats: int, device: torch.device) -> dict:
    """Seconds of each scoring variant over one super-batch and of one training step on its sub-batch."""
    cfg = MODEL_PRESETS[preset]
    torch.manual_seed(0)
    model = DualEncoder(cfg).to(device)
    images = torch.randn(super_batch, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size, (super_batch, cfg.context_length), device=device)
    sub = round(super_batch * (1 - filter_ratio))
    base, coarse = cfg.patch_size, cfg.patch_size * 2

    def score(patch: int):
        image = model.encode_image(images, patch)
        text = model.encode_text(tokens)
        return image.float(), text.float()

    def no_grad(patch: int = base):
        with torch.no_grad(), autocast(device, "amp"):
            return score(patch)

    def autograd():
        with autocast(device, "amp"):
            image, text = score(base)
        return image.sum() + text.sum()  # the graph is kept until here, as a scoring pass with grad would

    def inference():
        with torch.inference_mode(), autocast(device, "amp"):
            return score(base)

    def bf16():
        with torch.no_grad(), autocast(device, "bf16"):
            return score(base)

    optimizer = build_optimizer(model, OptimConfig())

    def train_step(patches: list[int]):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = multi_patch_loss(model, images[:sub], tokens[:sub], patches)
            loss.backward()
            optimizer.step()
        return step

    seconds = {
        "autograd": timed(autograd, repeats, device),
        "no_grad": timed(no_grad, repeats, device),
        "inference_mode": timed(inference, repeats, device),
        "bf16": timed(bf16, repeats, device),
        f"no_grad_patch{coarse}": timed(lambda: no_grad(coarse), repeats, device),
        "train_step": timed(train_step([base]), repeats, device),
        "train_step_flexi": timed(train_step([base, coarse]), repeats, device),
    }
    train = seconds["train_step"]
    score_flops = super_batch * flops.pair_forward_flops(cfg, base)
    train_flops = flops.training_step_flops(cfg, sub, [base])
    flexi_flops = (super_batch * flops.pair_forward_flops(cfg, coarse)
                   + flops.training_step_flops(cfg, sub, [base, coarse]))
    return {
        "model": preset, "super_batch": super_batch, "sub_batch": sub, "scoring_patch": base, "coarse_patch": coarse,
        "seconds": seconds,
        "scoring_share_of_jest_step": seconds["no_grad"] / (seconds["no_grad"] + train),
        "speedup_vs_autograd": seconds["autograd"] / seconds["no_grad"],
        "inference_mode_vs_no_grad": seconds["no_grad"] / seconds["inference_mode"],
        "bf16_vs_fp32": seconds["no_grad"] / seconds["bf16"],
        "jest_step_ratio": {"measured": (seconds["no_grad"] + train) / train,
                            "flops": (score_flops + train_flops) / train_flops},
        "flexi_step_ratio": {"measured": (seconds[f"no_grad_patch{coarse}"] + seconds["train_step_flexi"]) / train,
                             "flops": flexi_flops / train_flops},
        "scoring_gflop_per_s": score_flops / seconds["no_grad"] / 1e9,
        "training_gflop_per_s": train_flops / train / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=sorted(MODEL_PRESETS))
    parser.add_argument("--super-batch", type=int, default=640)
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report = {"benchmark": "scoring_pass", "device": str(device), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
              "results": [measure(m, args.super_batch, args.filter_ratio, args.repeats, device) for m in args.models]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
