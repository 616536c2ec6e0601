"""Loader throughput: decoded images/s of the training stream (data/loader.py) against the training step.

It writes img2dataset-like shards of JPEGs (a web pool's usual 256-400 px images of varied aspect ratio) locally
and on S3 (moto's S3 server on loopback, read through the project's minio client, as MinIO on a cluster), then
times StreamLoader batches (read, decode, resize + centre crop to 32, 64 and 224 px, uint8) with 1, 2 and N
decoding processes. It times a tiny and a small model's training step on this machine (AdamW, sigmoid loss;
images/s of trained pairs) and gives the loader's ratio to it (> 1: the loader keeps up). Finally the device
bytes the paper profile's batch needs per rank: each rank's uint8 share of the super-batch against the whole
super-batch in fp32 (what every rank held before).

    python bench/data_throughput.py                       # about 2-3 minutes on 2 CPU cores
    python bench/data_throughput.py --sizes 64 --workers 1 2 --images 256

Needs the test extra (moto) for the S3 part; prints JSON.
"""

import argparse
import io
import json
import os
import platform
import socket
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from webdataset import TarWriter

from flexi_jest import storage
from flexi_jest.config import MODEL_PRESETS, PROFILES, ModelConfig, OptimConfig
from flexi_jest.data.loader import StreamLoader
from flexi_jest.losses import multi_patch_loss
from flexi_jest.models import DualEncoder
from flexi_jest.train import build_optimizer


def jpeg_shards(root: str, images: int, per_shard: int, seed: int = 0) -> None:
    """Shards of smooth random JPEGs (256-400 px sides, varied aspect ratio) with captions."""
    rng = np.random.default_rng(seed)
    storage.makedirs(root)
    for shard in range(images // per_shard):
        buffer = io.BytesIO()
        with TarWriter(buffer) as writer:
            for i in range(per_shard):
                width, height = int(rng.integers(256, 400)), int(rng.integers(256, 400))
                small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=90)
                writer.write({"__key__": f"{shard:05d}{i:04d}", "jpg": jpg.getvalue(), "txt": b"a photo of a thing"})
        storage.write_bytes(storage.join(root, f"{shard:05d}.tar"), buffer.getvalue())


def loader_rate(spec: str, size: int, workers: int, batch: int, batches: int) -> float:
    """Decoded images/s over `batches` batches after one warm-up batch (the pool's start-up excluded)."""
    with StreamLoader(spec, batch, streams=8, seed=0, image_size=size, workers=workers) as loader:
        loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(batches):
            loader.next_batch()
        return batches * batch / (time.perf_counter() - t0)


def train_rate(model_cfg: ModelConfig, batch: int, steps: int) -> float:
    """Trained images/s of a plain SigLIP step (forward, loss, backward, AdamW) on random inputs, on the CPU."""
    torch.manual_seed(0)
    model = DualEncoder(model_cfg)
    optimizer = build_optimizer(model, OptimConfig())
    images = torch.randn(batch, 3, model_cfg.image_size, model_cfg.image_size)
    tokens = torch.randint(1, 1000, (batch, model_cfg.context_length))

    def step() -> None:
        loss = multi_patch_loss(model, images, tokens, [model_cfg.patch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def paper_device_bytes(worlds: list[int]) -> list[dict]:
    """Per-rank device bytes of the paper profile's images: uint8 share of the super-batch (+ the rank's uint8
    and fp32 share of the sub-batch it trains on) against the whole super-batch in fp32 on every rank."""
    learner = PROFILES["paper"]["train-learner"]
    super_batch = learner["super_batch_size"]
    sub_batch = round(super_batch * (1 - learner["filter_ratio"]))
    pixels = 3 * learner["model"]["image_size"] ** 2
    rows = []
    for world in worlds:
        share = super_batch // world * pixels
        train = sub_batch // world * pixels
        rows.append({"world": world, "super_batch": super_batch, "sub_batch": sub_batch,
                     "uint8_superbatch_share_gb": share / 1e9, "train_share_uint8_plus_fp32_gb": train * 5 / 1e9,
                     "per_rank_gb": (share + train * 5) / 1e9,
                     "before_fp32_whole_superbatch_gb": super_batch * pixels * 4 / 1e9})
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1, 2 and the CPU count")
    parser.add_argument("--images", type=int, default=512, help="images in the shards (8 shards)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    workers = args.workers or sorted({1, 2, os.cpu_count() or 1})
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "images": args.images, "batch": args.batch, "batches": args.batches, "loader": [], "training": {}}
    with tempfile.TemporaryDirectory() as tmp:
        places = {"local": os.path.join(tmp, "pool")}
        jpeg_shards(places["local"], args.images, args.images // 8)
        server = None
        if not args.no_s3:
            import logging

            from moto.server import ThreadedMotoServer
            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            os.environ.update(FLEXI_JEST_S3_ENDPOINT=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                              AWS_SECRET_ACCESS_KEY="bench")
            storage.s3_client().make_bucket("bench")
            for name in storage.list_names(places["local"], ".tar"):
                storage.upload_file(os.path.join(places["local"], name), f"s3://bench/pool/{name}")
            places["s3"] = "s3://bench/pool"
        try:
            for place, spec in places.items():
                for size in args.sizes:
                    for count in workers:
                        rate = loader_rate(spec, size, count, args.batch, args.batches)
                        report["loader"].append({"storage": place, "image_size": size, "workers": count,
                                                 "images_per_second": round(rate, 1)})
        finally:
            if server is not None:
                server.stop()
    for preset in ("tiny", "small"):
        cfg = MODEL_PRESETS[preset]
        rate = train_rate(cfg, args.batch, 2)
        best = max(r["images_per_second"] for r in report["loader"] if r["image_size"] == cfg.image_size) \
            if cfg.image_size in args.sizes else None
        report["training"][preset] = {"image_size": cfg.image_size, "batch": args.batch,
                                      "train_images_per_second": round(rate, 1),
                                      "best_loader_images_per_second": best,
                                      "loader_to_training_ratio": round(best / rate, 2) if best else None}
    report["paper_device_bytes_per_rank"] = paper_device_bytes([8, 16, 64])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
