"""An img2dataset-layout pool, written by img2dataset itself from a URL list served by http.server on loopback.

The images are the project's shapes scenes, placed on wide and tall canvases (so the reader's aspect-preserving
crop matters); img2dataset downloads them as a team's pool would be downloaded, into `00000.tar`, ... with
`000000000.jpg/.txt/.json` members and a `00000_stats.json` beside each shard (resize_mode "no": images keep
their size). The last shard holds only a broken URL, so it is empty (`successes: 0`), as the last shard of a real
pool often is.
"""

import csv
import functools
import http.server
import os
import threading
from pathlib import Path

from PIL import Image

from flexi_jest.data.shapes import generate


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """directory served over http on loopback: (server, base URL)."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def write_images(directory: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n shapes scenes as PNG files of varied aspect ratio; returns [(file name, caption)]."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(generate("pool", n, seed, image_size=48)):
        width, height = [(96, 48), (48, 96), (48, 48), (72, 48)][i % 4]
        canvas = Image.new("RGB", (width, height), sample.image.getpixel((0, 0)))
        canvas.paste(sample.image, ((width - 48) // 2, (height - 48) // 2))
        name = f"img{i:04d}.png"
        canvas.save(directory / name)
        rows.append((name, sample.caption))
    return rows


def img2dataset_pool(root: Path, n: int = 78, per_shard: int = 20, broken: int = 2) -> Path:
    """Run img2dataset on n served images and `broken` URLs that 404 (img2dataset records them as failures, as in
    any real pool), then one more broken URL alone in a last shard. Returns the output folder: (n + broken) /
    per_shard full shards and an empty last one, with their parquet and stats files (defaults: 00000.tar holds 18
    samples, 00001..00003.tar 20 each, 00004.tar none)."""
    if (n + broken) % per_shard:
        raise ValueError("n + broken must fill whole shards, so that the last shard holds only a broken URL")
    # albumentations (imported by img2dataset) asks PyPI otherwise
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    served = root / "served"
    rows = write_images(served, n)
    server, base = serve(served)
    try:
        url_list = root / "urls.csv"
        with open(url_list, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for i, (name, caption) in enumerate(rows):
                writer.writerow([f"{base}/{name}", caption])
                if i < broken:
                    writer.writerow([f"{base}/missing{i}.png", "a picture that is not there"])
            writer.writerow([f"{base}/missing-last.png", "the only URL of the last shard, which fails"])
        out = root / "pool"
        download(url_list=str(url_list), output_folder=str(out), input_format="csv", url_col="url",
                 caption_col="caption", output_format="webdataset", resize_mode="no", processes_count=1,
                 thread_count=4, number_sample_per_shard=per_shard, timeout=5, enable_wandb=False,
                 distributor="multiprocessing", compute_hash=None, disallowed_header_directives=[])
    finally:
        server.shutdown()
        server.server_close()
    return out
