"""Training: the reference (plain SigLIP on curated data) and the JEST / Flexi-JEST learner.

One learner step (JEST.md):
  1. draw a super-batch of B pairs from the pool stream (uniform draws only the sub-batch b),
  2. score it: the learner's embeddings at the scoring patch size (no grad) and the reference's
     cached embeddings give two [B, B] pair-loss matrices, combined into a score matrix,
  3. select b = B (1 - filter_ratio) examples (uniform / independent / joint),
  4. train on them: the sub-batch is split evenly over train_patch_sizes (Flexi: half at 16, half
     at 32), the image embeddings are concatenated and the sigmoid loss taken over the whole b x b.

Runs checkpoint every `checkpoint_every` steps and resume exactly: same weights as an uninterrupted run.
"""

import json
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from flexi_jest import flops, storage
from flexi_jest.checkpoint import load_latest_checkpoint, load_model, model_state, save_checkpoint, save_model
from flexi_jest.config import FlopsBreakdown, OptimConfig, TrainingConfig, TrainLearnerConfig, TrainReferenceConfig, TrainResult
from flexi_jest.data.shards import SampleStream
from flexi_jest.device import autocast, resolve_device, to_model_input
from flexi_jest.evaluate import evaluate_model
from flexi_jest.losses import sigmoid_loss
from flexi_jest.model import DualEncoder, Tokenizer
from flexi_jest.reference_cache import CacheError, ReferenceCache
from flexi_jest.selection import independent_select, joint_select_from_embeddings, own_scores


def build_optimizer(model: DualEncoder, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings' scale/bias scalars (tensors with < 2 dims)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_steps, then cosine decay to zero at `steps`."""
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_sizes(batch: int, parts: int) -> list[int]:
    return [batch // parts + (1 if i < batch % parts else 0) for i in range(parts)]


def multi_patch_loss(
    model: DualEncoder, images: Tensor, tokens: Tensor, patch_sizes: list[int], loss_chunk_size: int | None = None
) -> Tensor:
    """Sigmoid loss of a batch whose images are split evenly over patch_sizes. images [b, 3, H, W], tokens [b, L]."""
    image_emb = torch.cat([
        model.encode_image(part, patch)
        for part, patch in zip(torch.split(images, split_sizes(images.shape[0], len(patch_sizes))), patch_sizes)
        if part.shape[0] > 0
    ])
    text_emb = model.encode_text(tokens)
    return sigmoid_loss(image_emb, text_emb, model.logit_scale, model.logit_bias, loss_chunk_size)


@dataclass
class StepOutput:
    loss: Tensor  # scalar with graph
    trained: int  # pairs trained on this step
    flops: dict[str, float]  # FlopsBreakdown parts spent this step
    stats: dict[str, float] = field(default_factory=dict)  # selection statistics


StepFn = Callable[[DualEncoder, list[dict[str, Any]], torch.Generator], StepOutput]


class Prefetcher:
    """Reads the next batch in a background thread while the current step computes.

    Yields (batch, stream_state_after_batch): a checkpoint stores the state that belongs to the
    last batch *trained on*, not to the batch already prefetched, so resume stays exact. An error
    in the reader is re-raised in the training thread.
    """

    def __init__(self, stream: SampleStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                batch = self.stream.take(self.batch_size)
                self._put((batch, self.stream.state_dict(), None))
        except BaseException as exc:  # handed to the training thread
            self._put((None, None, exc))

    def _put(self, item) -> None:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        batch, state, error = self.queue.get()
        if error is not None:
            self.close()
            raise error
        return batch, state

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def run_training(
    cfg: TrainingConfig,
    model: DualEncoder,
    stream: SampleStream,
    batch_size: int,
    step_fn: StepFn,
    base_flops: FlopsBreakdown,
    device: torch.device,
    description: str,
) -> TrainResult:
    """The loop both trainers share: resume, draw batch_size samples per step, step, log, checkpoint, write the result."""
    started = time.perf_counter()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed + 1)
    ledger, step = base_flops, 0
    metrics_path = storage.join(cfg.out_dir, "metrics.jsonl")
    history: list[dict[str, Any]] = []
    checkpoint = load_latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"]["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["rng"]["generator"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        random.setstate(checkpoint["rng"]["python"])
        stream.load_state_dict(checkpoint["data"])
        ledger = FlopsBreakdown.model_validate(checkpoint["flops"])
        history = checkpoint["history"]
        step = checkpoint["step"]
    start_step = step
    totals = {"loss": 0.0, "trained": 0, "seconds": 0.0}
    stats_sums: dict[str, float] = {}

    data_state = stream.state_dict()

    def checkpoint_now() -> None:
        save_checkpoint(cfg.out_dir, step, {
            "model": model_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()},
            "data": data_state, "flops": ledger.model_dump(), "history": history, "step": step,
            "config": cfg.model_dump(),
        })
        storage.write_bytes(metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=description, disable=not cfg.progress, dynamic_ncols=True, mininterval=2.0)
    loss_value = float("nan")
    prefetcher = Prefetcher(stream, batch_size)
    try:
        while step < cfg.steps:
            out, seconds, data_state = _one_step(model, prefetcher, step_fn, generator, optimizer, scheduler, cfg)
            loss_value = out.loss.item()
            step += 1
            ledger = flops.add(ledger, **out.flops)
            totals["loss"] += loss_value
            totals["trained"] += out.trained
            totals["seconds"] += seconds
            for key, value in out.stats.items():
                stats_sums[key] = stats_sums.get(key, 0.0) + value
            evaluate_now = cfg.eval_every > 0 and cfg.eval_data and (step % cfg.eval_every == 0 or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate_now:
                history.append({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                                "images_per_second": out.trained / seconds, "seconds": seconds,
                                "flops": ledger.model_dump(), "total_flops": ledger.total, **out.stats})
            if evaluate_now:
                history[-1]["eval"] = evaluate_during_training(model, cfg, device)
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{out.trained / seconds:.0f}",
                            sel_ms=f"{1000 * out.stats.get('selection_seconds', 0.0):.1f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint_now()
    finally:
        prefetcher.close()
        bar.close()
    model_uri = storage.join(cfg.out_dir, "model.pt")
    sha = save_model(model, model_uri)
    steps_run = max(1, step - start_step)
    result = TrainResult(
        out_dir=cfg.out_dir,
        checkpoint=model_uri,
        checkpoint_sha256=sha,
        steps=step,
        final_loss=history[-1]["loss"] if history else loss_value,
        seconds=time.perf_counter() - started,
        images_per_second=totals["trained"] / totals["seconds"] if totals["seconds"] else 0.0,
        flops=ledger,
        total_flops=ledger.total,
        metrics_path=metrics_path,
        selection={k: v / steps_run for k, v in stats_sums.items()},
    )
    storage.write_bytes(storage.join(cfg.out_dir, "result.json"), result.model_dump_json(indent=1).encode())
    if stream.stats.skipped:
        print(f"[{description}] data: {stream.stats.summary()}")
    return result


def evaluate_during_training(model: DualEncoder, cfg: TrainingConfig, device: torch.device) -> dict[str, float]:
    """Zero-shot metrics on cfg.eval_data at the current weights (no randomness: resume stays exact)."""
    splits = evaluate_model(model, cfg.eval_data, None, 256, device, cfg.eval_max_samples)
    model.train()
    return {f"{name}.{key}": value for name, metrics in splits.items()
            for key, value in metrics.model_dump().items() if value is not None}


def _one_step(model, prefetcher, step_fn, generator, optimizer, scheduler, cfg) -> tuple[StepOutput, float, dict[str, int]]:
    """Draw, forward, backward, update. Returns the step's output, its wall seconds and the data state after it."""
    t0 = time.perf_counter()
    batch, data_state = prefetcher.next()
    out = step_fn(model, batch, generator)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    loss = out.loss.item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss}: the run diverged (lower optim.lr)")
    return out, time.perf_counter() - t0, data_state


def _prepare(cfg: TrainingConfig) -> tuple[torch.device, Tokenizer]:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return resolve_device(cfg.device), Tokenizer(cfg.model.context_length)


# ---- the reference --------------------------------------------------------------------------------------------


def train_reference(cfg: TrainReferenceConfig) -> TrainResult:
    """Plain SigLIP training of the reference on the curated split."""
    device, tokenizer = _prepare(cfg)
    if cfg.init_checkpoint:
        model, _ = load_model(cfg.init_checkpoint, device)
        if model.cfg != cfg.model:
            raise ValueError(f"init_checkpoint {cfg.init_checkpoint} has model {model.cfg}, config asks for {cfg.model}")
    else:
        model = DualEncoder(cfg.model).to(device)
    stream = SampleStream(cfg.data, cfg.model.image_size, cfg.seed, cfg.shuffle_buffer)
    step_flops = flops.training_step_flops(cfg.model, cfg.batch_size, cfg.train_patch_sizes)

    def step_fn(model: DualEncoder, batch: list[dict[str, Any]], generator: torch.Generator) -> StepOutput:
        images = to_model_input(torch.stack([s["image"] for s in batch]), device)
        tokens = tokenizer([s["caption"] for s in batch]).to(device)
        with autocast(device):
            loss = multi_patch_loss(model, images, tokens, cfg.train_patch_sizes, cfg.loss_chunk_size)
        return StepOutput(loss, len(batch), {"reference_training": step_flops})

    return run_training(cfg, model, stream, cfg.batch_size, step_fn, FlopsBreakdown(), device, "reference")


# ---- the learner ------------------------------------------------------------------------------------------------


def train_learner(cfg: TrainLearnerConfig) -> TrainResult:
    """JEST / Flexi-JEST learner training on the pool (see the module docstring)."""
    device, tokenizer = _prepare(cfg)
    model = DualEncoder(cfg.model).to(device)
    needs_reference = cfg.method != "uniform" and cfg.score != "hard_learner"
    cache = ReferenceCache(cfg.reference_cache, cfg.pool, cfg.reference_sha256) if needs_reference else None
    stream = SampleStream(cfg.pool, cfg.model.image_size, cfg.seed, cfg.shuffle_buffer, cache.attach if cache else None)
    sub_batch = cfg.sub_batch_size
    draw = sub_batch if cfg.method == "uniform" else cfg.super_batch_size
    scoring_patch = cfg.scoring_patch_size or cfg.model.patch_size
    train_flops = flops.training_step_flops(cfg.model, sub_batch, cfg.train_patch_sizes)
    uses_learner = cfg.score != "easy_reference"
    score_flops = 0 if cfg.method == "uniform" else flops.scoring_step_flops(
        cfg.model, draw, scoring_patch, sub_batch, cfg.method, uses_learner,
        cache.manifest["embed_dim"] if cache else None)

    def step_fn(model: DualEncoder, batch: list[dict[str, Any]], generator: torch.Generator) -> StepOutput:
        images = to_model_input(torch.stack([s["image"] for s in batch]), device)
        tokens = tokenizer([s["caption"] for s in batch]).to(device)
        stats: dict[str, float] = {}
        if cfg.method == "uniform":
            chosen = torch.arange(draw, device=device)
        else:
            learner = reference = None
            if uses_learner:
                with torch.no_grad(), autocast(device):
                    learner = (model.encode_image(images, scoring_patch).float(), model.encode_text(tokens).float(),
                               model.logit_scale.detach(), model.logit_bias.detach())
            if needs_reference:
                missing = [s["key"] for s in batch if "ref_image_emb" not in s]
                if missing:
                    raise CacheError(f"samples {missing[:5]} have no reference-cache entry; re-run cache-reference")
                reference = (torch.stack([s["ref_image_emb"] for s in batch]).to(device).float(),
                             torch.stack([s["ref_text_emb"] for s in batch]).to(device).float(),
                             cache.logit_scale.to(device), cache.logit_bias.to(device))
            t0 = time.perf_counter()
            own = own_scores(cfg.score, learner, reference)  # [B]
            if cfg.method == "joint":  # Algorithm 1 without materialising the [B, B] score matrix
                chosen = joint_select_from_embeddings(cfg.score, learner, reference, sub_batch, cfg.n_chunks, generator)
            else:
                chosen = independent_select(own, sub_batch, cfg.independent_mode, generator)
            stats["selection_seconds"] = time.perf_counter() - t0
            stats["score_selected_mean"] = own[chosen].mean().item()
            stats["score_superbatch_mean"] = own.mean().item()
        noisy = torch.tensor([s["meta"].get("noise", "clean") != "clean" for s in batch])
        stats["noisy_fraction_selected"] = noisy[chosen.cpu()].float().mean().item()
        stats["noisy_fraction_drawn"] = noisy.float().mean().item()
        with autocast(device):
            loss = multi_patch_loss(model, images[chosen], tokens[chosen], cfg.train_patch_sizes, cfg.loss_chunk_size)
        return StepOutput(loss, sub_batch, {"learner_scoring": score_flops, "learner_training": train_flops}, stats)

    base = FlopsBreakdown(reference_training=cfg.reference_training_flops, reference_caching=cfg.reference_caching_flops)
    if not needs_reference:
        base = FlopsBreakdown()
    name = f"learner[{cfg.method}{'' if cfg.method == 'uniform' else '/' + cfg.score}]"
    return run_training(cfg, model, stream, draw, step_fn, base, device, name)
