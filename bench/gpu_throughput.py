"""Throughput of one device: learner training, scoring and joint selection, for the model presets.

For each preset it times, on random inputs at the preset's image size (bf16 autocast and SDPA on CUDA):
  - scoring:   no-grad image + text forward over a super-batch B, at the base patch size and at Flexi's
               scoring patch size (2x the base: a quarter of the tokens)
  - training:  one AdamW step (forward, sigmoid loss, backward, update) on the sub-batch b = B (1 - f),
               at the base patch size and mixed (half base, half 2x base)
  - selection: joint_select_from_embeddings (learnability, 16 chunks) of b from B
and prints JSON: images/s, TFLOP/s achieved (from flexi_jest.flops), and the time of a whole JEST step
(scoring + selection + training) with the share of each part.

    python bench/gpu_throughput.py                                   # tiny and vit_b16 on the GPU
    python bench/gpu_throughput.py --presets tiny --super-batch 640 --device cpu --repeats 2
    python bench/gpu_throughput.py --compile                         # torch.compile the training forward
"""

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from timing import timed  # bench/timing.py

from flexi_jest import flops
from flexi_jest.config import MODEL_PRESETS, OptimConfig
from flexi_jest.device import autocast, resolve_device
from flexi_jest.losses import multi_patch_loss
from flexi_jest.models import DualEncoder
from flexi_jest.selection import joint_select_from_embeddings
from flexi_jest.train import build_optimizer

DEFAULT_SUPER_BATCH = {"tiny": 10240, "small": 5120, "vit_b16": 1280}


def chunked(fn, images: torch.Tensor, tokens: torch.Tensor, chunk: int):
    for start in range(0, images.shape[0], chunk):
        fn(images[start:start + chunk], tokens[start:start + chunk])


def measure(preset: str, super_batch: int, filter_ratio: float, repeats: int, device: torch.device,
            compile_model: bool, scoring_chunk: int) -> dict:
    cfg = MODEL_PRESETS[preset]
    sub_batch = round(super_batch * (1 - filter_ratio))
    torch.manual_seed(0)
    model = DualEncoder(cfg).to(device)
    net = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(model, OptimConfig())
    images = torch.randn(super_batch, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(1, cfg.vocab_size - 1, (super_batch, cfg.context_length), device=device)
    base, flexi = cfg.patch_size, 2 * cfg.patch_size
    out: dict = {"preset": preset, "super_batch": super_batch, "sub_batch": sub_batch,
                 "image_size": cfg.image_size, "patch_sizes": [base, flexi]}

    def score(patch: int):
        def run(im, tok):
            with torch.no_grad(), autocast(device):
                model.encode_image(im, patch), model.encode_text(tok)
        return lambda: chunked(run, images, tokens, scoring_chunk)

    for name, patch in (("scoring", base), ("scoring_flexi", flexi)):
        seconds = timed(score(patch), repeats, device, warmup=2)
        work = super_batch * flops.pair_forward_flops(cfg, patch)
        out[name] = {"seconds": seconds, "images_per_second": super_batch / seconds,
                     "tflops_per_second": work / seconds / 1e12}

    def train(patch_sizes: list[int]):
        def run():
            with autocast(device):
                loss = multi_patch_loss(model, images[:sub_batch], tokens[:sub_batch], patch_sizes, net=net)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    for name, patch_sizes in (("training", [base]), ("training_mixed", [base, flexi])):
        seconds = timed(train(patch_sizes), repeats, device, warmup=2)
        work = flops.training_step_flops(cfg, sub_batch, patch_sizes)
        out[name] = {"seconds": seconds, "images_per_second": sub_batch / seconds,
                     "tflops_per_second": work / seconds / 1e12}

    g = torch.Generator(device=device).manual_seed(0)

    def unit() -> torch.Tensor:
        return F.normalize(torch.randn(super_batch, cfg.embed_dim, generator=g, device=device), dim=-1)

    scale, bias = torch.tensor(2.3, device=device), torch.tensor(-10.0, device=device)
    learner, reference = (unit(), unit(), scale, bias), (unit(), unit(), scale, bias)
    seconds = timed(lambda: joint_select_from_embeddings("learnability", learner, reference, sub_batch, 16, g),
                    repeats, device, warmup=2)
    out["selection"] = {"seconds": seconds}

    for variant, scoring, training in (("jest", "scoring", "training"),
                                       ("flexi_jest", "scoring_flexi", "training_mixed")):
        parts = {"scoring": out[scoring]["seconds"], "selection": seconds, "training": out[training]["seconds"]}
        step = sum(parts.values())
        out[f"{variant}_step"] = {"seconds": step, "share": {k: v / step for k, v in parts.items()},
                                  "trained_images_per_second": sub_batch / step}
    out["uniform_step_images_per_second"] = out["training"]["images_per_second"]
    model = optimizer = images = tokens = net = None  # free them (the closures above hold the same cells)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,vit_b16", help=f"comma-separated from {sorted(MODEL_PRESETS)}")
    parser.add_argument("--super-batch", type=int, default=None, help=f"B (default per preset: {DEFAULT_SUPER_BATCH})")
    parser.add_argument("--filter-ratio", type=float, default=0.8)
    parser.add_argument("--scoring-chunk", type=int, default=4096, help="images per scoring forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {"benchmark": "gpu_throughput", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or "cpu", "torch": torch.__version__, "compile": args.compile,
              "autocast": "bf16" if device.type == "cuda" else "off", "results": []}
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        if preset not in MODEL_PRESETS:
            parser.error(f"unknown preset {preset!r}; expected some of {sorted(MODEL_PRESETS)}")
        super_batch = args.super_batch or DEFAULT_SUPER_BATCH[preset]
        report["results"].append(measure(preset, super_batch, args.filter_ratio, args.repeats, device, args.compile,
                                         args.scoring_chunk))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
