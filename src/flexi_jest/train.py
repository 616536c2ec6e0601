"""Training: the reference (plain SigLIP on curated data) and the JEST / Flexi-JEST learner.

One learner step (docs/method.md#the-learner-step):
  1. draw a super-batch of B pairs from the pool stream (uniform draws only the sub-batch b),
  2. score it: the learner's embeddings at the scoring patch size (no grad) and the reference's
     cached embeddings give two [B, B] pair-loss matrices, combined into a score matrix,
  3. select b = B (1 - filter_ratio) examples (uniform / independent / joint),
  4. train on them: the sub-batch is split evenly over train_patch_sizes (Flexi: half at 16, half
     at 32), the image embeddings are concatenated and the sigmoid loss taken over the whole b x b.

Runs checkpoint every `checkpoint_every` steps and resume exactly: same weights as an uninterrupted run.
Under torchrun (several processes) the same loops run data-parallel with DDP: see distributed.py.
"""

import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from flexi_jest import flops, storage
from flexi_jest.checkpoint import (
    load_latest_checkpoint,
    model_state,
    remove_orphaned_temp_files,
    restore_rng_states,
    rng_states,
    save_checkpoint,
    save_model,
)
from flexi_jest.config import (
    FlopsBreakdown,
    OptimConfig,
    TrainingConfig,
    TrainLearnerConfig,
    TrainReferenceConfig,
    TrainResult,
)
from flexi_jest.data.loader import Prefetcher, StreamLoader, merge_states
from flexi_jest.data.noise import CLEAN_KINDS, SAMPLE_KINDS, kind_shares, sample_kind
from flexi_jest.data.specs import DatasetSpec, resolve
from flexi_jest.data.transforms import ImageTransform
from flexi_jest.device import autocast, to_model_input
from flexi_jest.distributed import (
    World,
    barrier,
    broadcast_object,
    check_divisible,
    exchange_rows,
    gather_objects,
    gather_rows,
    init_world,
    shard,
    sum_over_ranks,
)
from flexi_jest.evaluate import evaluate_model
from flexi_jest.export import export_open_clip
from flexi_jest.finite import check_model_finite
from flexi_jest.losses import accumulated_loss_backward, multi_patch_loss
from flexi_jest.models import DualEncoder, Tokenizer
from flexi_jest.models.pretrained import load_pretrained
from flexi_jest.reference_cache import CacheError, OfflineFilter, ReferenceCache
from flexi_jest.run_identity import check_out_dir, write_run_config
from flexi_jest.selection import independent_select, joint_select_from_embeddings, own_scores


def build_optimizer(model: DualEncoder, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, embeddings' scale/bias scalars (tensors with < 2 dims)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_steps, then cosine decay to zero at `steps`."""
    warmup = min(cfg.warmup_steps, max(steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepOutput:
    loss: Tensor  # scalar with graph: this rank's share of the step's loss (the loss itself on one process)
    # (detached when the step function already back-propagated it: backward_done)
    trained: int  # pairs trained on this step
    flops: dict[str, float]  # FlopsBreakdown parts spent this step
    stats: dict[str, float] = field(default_factory=dict)  # selection statistics
    backward_done: bool = False  # gradients already accumulated (micro-batches): no backward of loss


StepFn = Callable[[torch.nn.Module, list[dict[str, Any]], torch.Generator], StepOutput]  # (net, rank's rows, generator)


def build_loader(cfg: TrainingConfig, spec: "str | DatasetSpec", mode: str, batch_size: int, world: World,
                 attach=None) -> StreamLoader:
    """The training stream of a stage (data/loader.py): this rank's rows of every batch of batch_size, decoded
    (uint8, the model's image size, cfg.train_crop) in cfg.data_workers processes."""
    size = cfg.model.image_size
    transform = ImageTransform(size, "random_resized", seed=cfg.seed) if cfg.train_crop == "random_resized" else None
    return StreamLoader(spec, batch_size, streams=cfg.data_streams, mode=mode, seed=cfg.seed, image_size=size,
                        transform=transform, workers=cfg.data_workers, attach=attach, rank=world.rank, world=world.size,
                        max_consecutive_bad=cfg.max_consecutive_bad_samples)


def run_training(
    cfg: TrainingConfig,
    model: DualEncoder,
    stream: StreamLoader,
    step_fn: StepFn,
    base_flops: FlopsBreakdown,
    device: torch.device,
    description: str,
    world: World = World(),
) -> TrainResult:
    """The loop both trainers share: resume, draw a batch per step (this rank's rows of it), step, log, checkpoint,
    write the result. Distributed: the model is wrapped in DDP for the step; rank 0 alone evaluates and writes files."""
    started = time.perf_counter()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed + 1)
    ledger, step = base_flops, 0
    metrics_path = storage.join(cfg.out_dir, "metrics.jsonl")
    history: list[dict[str, Any]] = []
    if world.is_main:  # what a kill during an earlier run's checkpoint write left behind
        removed = remove_orphaned_temp_files(cfg.out_dir)
        if removed:
            print(f"[{description}] removed {len(removed)} temporary files of an interrupted write: {removed}")
    # out_dir must hold nothing, or this very config's work (run_identity): never another config's
    latest = None if cfg.overwrite else load_latest_checkpoint(cfg.out_dir)
    state = check_out_dir(cfg, latest.get("config") if latest else None, remove=world.is_main)
    barrier(world)
    if state == "finished":
        if world.is_main:
            print(f"[{description}] {cfg.out_dir} already holds a finished run of this config: its result is "
                  "returned without recomputing (overwrite: true to train again)", flush=True)
        return TrainResult.model_validate_json(storage.read_bytes(storage.join(cfg.out_dir, "result.json")))
    if world.is_main:
        write_run_config(cfg)
    checkpoint = latest if state == "resume" and cfg.resume else None
    if checkpoint is not None:
        model.clip.load_state_dict(checkpoint["model"]["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        restore_rng_states(checkpoint["rng"], generator)
        stream.load_state_dict(checkpoint["data"])
        ledger = FlopsBreakdown.model_validate(checkpoint["flops"])
        history = checkpoint["history"]
        step = checkpoint["step"]
    net: torch.nn.Module = model
    if world.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:  # the training forward; scoring and evaluation call the plain towers
        net = torch.compile(net)
    start_step = step
    totals = {"loss": 0.0, "trained": 0, "seconds": 0.0}
    stats_sums: dict[str, float] = {}

    data_state = stream.state_dict()

    def checkpoint_now() -> None:
        data = merge_states(gather_objects(data_state, world))  # each rank advanced its own streams
        if not world.is_main:
            return
        save_checkpoint(cfg.out_dir, step, {
            "model": model_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": rng_states(generator),
            "data": data, "flops": ledger.model_dump(), "history": history, "step": step,
            "config": cfg.model_dump(),
        })
        storage.write_bytes(metrics_path, "".join(json.dumps(h) + "\n" for h in history).encode())

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=description, disable=not (cfg.progress and world.is_main),
               dynamic_ncols=True, mininterval=2.0)
    loss_value = float("nan")
    prefetcher = Prefetcher(stream)
    try:
        while step < cfg.steps:
            out, loss_value, seconds, data_state = _one_step(net, prefetcher, step_fn, generator, optimizer, scheduler,
                                                             cfg, world)
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
            if evaluate_now and world.is_main:
                history[-1]["eval"] = evaluate_during_training(model, cfg, device)
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{out.trained / seconds:.0f}",
                            sel_ms=f"{1000 * out.stats.get('selection_seconds', 0.0):.1f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint_now()
    finally:
        prefetcher.close()
        stream.close()
        bar.close()
    # the loss is checked before each update, so the last update is checked here: no diverged model.pt or result
    check_model_finite(model, f"{description} in {cfg.out_dir} after step {step}", cfg.train_patch_sizes)
    model_uri = storage.join(cfg.out_dir, "model.pt")
    sha = broadcast_object(save_model(model, model_uri) if world.is_main else None, world)  # rank 0 writes it
    open_clip_dir = storage.join(cfg.out_dir, "open_clip")
    if world.is_main:
        export_open_clip(model, open_clip_dir)
    steps_run = max(1, step - start_step)
    result = TrainResult(
        out_dir=cfg.out_dir,
        checkpoint=model_uri,
        checkpoint_sha256=sha,
        open_clip_dir=open_clip_dir,
        steps=step,
        final_loss=history[-1]["loss"] if history else loss_value,
        seconds=time.perf_counter() - started,
        images_per_second=totals["trained"] / totals["seconds"] if totals["seconds"] else 0.0,
        flops=ledger,
        total_flops=ledger.total,
        metrics_path=metrics_path,
        selection={k: v / steps_run for k, v in stats_sums.items()},
        world_size=world.size,
        read_stats=stream.stats.to_summary(),
    )
    if world.is_main:
        storage.write_bytes(storage.join(cfg.out_dir, "result.json"), result.model_dump_json(indent=1).encode())
    if stream.stats.skipped and world.is_main:
        print(f"[{description}] data: {stream.stats.summary()}")
    return result


def evaluate_during_training(model: DualEncoder, cfg: TrainingConfig, device: torch.device) -> dict[str, float]:
    """Zero-shot metrics on cfg.eval_data at the current weights (no randomness: resume stays exact)."""
    splits = evaluate_model(model, cfg.eval_data, None, 256, device, cfg.eval_max_samples)
    model.train()
    return {f"{name}.{key}": value for name, metrics in splits.items()
            for key, value in metrics.model_dump().items() if isinstance(value, (int, float))}


def _one_step(net, prefetcher, step_fn, generator, optimizer, scheduler, cfg, world: World
              ) -> tuple[StepOutput, float, float, dict[str, int]]:
    """Draw, forward, backward, update. Returns the step's output, its loss (summed over ranks), its wall
    seconds and the data state after it. DDP averages gradients over ranks; each rank's loss is its
    share of the sum, so the share is scaled by the world size to give the full loss's gradient."""
    t0 = time.perf_counter()
    batch, data_state = prefetcher.next()
    optimizer.zero_grad(set_to_none=True)
    out = step_fn(net, batch, generator)
    if not out.backward_done:
        (out.loss * world.size if world.distributed else out.loss).backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    loss = sum_over_ranks(out.loss, world).item()
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss}: the run diverged (lower optim.lr)")
    return out, loss, time.perf_counter() - t0, data_state


def _prepare(cfg: TrainingConfig) -> tuple[World, torch.device, Tokenizer]:
    """Seeds (the same on every rank: every rank builds the same model and reads the same stream), the
    world (torchrun's processes, or one) and this rank's device, the tokenizer."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    world, device = init_world(cfg.device)
    if cfg.micro_batch_size and world.distributed:
        raise ValueError("micro_batch_size (gradient accumulation) runs on one process; with several, "
                         "each rank's share of the sub-batch is smaller already: unset it or use processes=1")
    return world, device, Tokenizer(cfg.model)


def build_model(cfg: TrainingConfig, device: torch.device) -> DualEncoder:
    """cfg.model, from cfg.init_checkpoint (an open_clip checkpoint) or from scratch (seeded by _prepare)."""
    model = DualEncoder(cfg.model)
    if cfg.init_checkpoint:
        load_pretrained(model, cfg.init_checkpoint)
    return model.to(device)


def train_loss(model: DualEncoder, net: torch.nn.Module, cfg: TrainingConfig, images: Tensor, tokens: Tensor,
               world: World, batch: int, device: torch.device) -> tuple[Tensor, bool]:
    """(loss, backward_done) of a training (sub-)batch: the rank's share (multi_patch_loss), or with
    cfg.micro_batch_size the whole loss, its gradients already accumulated micro-batch by micro-batch."""
    if cfg.micro_batch_size and cfg.micro_batch_size < images.shape[0]:
        return accumulated_loss_backward(model, images, tokens, cfg.train_patch_sizes, cfg.micro_batch_size,
                                         cfg.loss_chunk_size, lambda: autocast(device, cfg.precision), net), True
    with autocast(device, cfg.precision):
        return multi_patch_loss(model, images, tokens, cfg.train_patch_sizes, cfg.loss_chunk_size, world, batch,
                                net), False


# ---- the reference --------------------------------------------------------------------------------------------


def train_reference(cfg: TrainReferenceConfig) -> TrainResult:
    """Plain SigLIP training of the reference on the curated split."""
    world, device, tokenizer = _prepare(cfg)
    check_divisible("batch_size", cfg.batch_size, world)
    model = build_model(cfg, device)
    stream = build_loader(cfg, cfg.data, cfg.data_mode, cfg.batch_size, world)
    step_flops = flops.training_step_flops(cfg.model, cfg.batch_size, cfg.train_patch_sizes)

    def step_fn(net: torch.nn.Module, mine: list[dict[str, Any]], generator: torch.Generator) -> StepOutput:
        """mine: this rank's rows shard(batch_size, world) of the batch, decoded on this rank only."""
        images = to_model_input(torch.stack([s["image"] for s in mine]), device, cfg.model.mean, cfg.model.std)
        tokens = tokenizer([s["caption"] for s in mine]).to(device)
        loss, done = train_loss(model, net, cfg, images, tokens, world, cfg.batch_size, device)
        return StepOutput(loss, cfg.batch_size, {"reference_training": step_flops}, backward_done=done)

    return run_training(cfg, model, stream, step_fn, FlopsBreakdown(), device, "reference", world)


# ---- the learner ------------------------------------------------------------------------------------------------


class LearnerStep:
    """One learner step on this rank's rows of the drawn batch (docs/method.md#the-learner-step): score the
    super-batch (the learner's embeddings at the scoring patch, no grad, and the reference's cached ones), select
    the sub-batch, train on it. Uniform and the offline filter draw the sub-batch itself and skip the first two.

    Its one piece of state across steps is `dropped_seen`, the offline filter's drop count at the last step (the
    stream reads one batch ahead, so each step reports the drops since the previous one). Called as a StepFn:
    step(net, mine, generator) -> StepOutput, `mine` this rank's rows shard(draw, world) of the batch, decoded on
    this rank only (uint8 on the host); the selected rows travel (uint8) to the ranks that train on them, so no
    rank holds the whole super-batch on its device."""

    def __init__(self, cfg: TrainLearnerConfig, model: DualEncoder, tokenizer: Tokenizer, device: torch.device,
                 world: World, cache: ReferenceCache | None, offline_filter: OfflineFilter | None):
        self.cfg, self.model, self.tokenizer, self.device, self.world = cfg, model, tokenizer, device, world
        self.cache, self.offline_filter = cache, offline_filter
        self.sub_batch = cfg.sub_batch_size
        self.draw = self.sub_batch if self.uniform_draw else cfg.super_batch_size  # pairs drawn per step
        self.scoring_rows = shard(self.draw, world)
        self.local_scope = world.distributed and cfg.selection_scope == "local"
        self.scoring_patch = cfg.scoring_patch_size or cfg.model.patch_size
        # collectives run on the device with NCCL, on the host with gloo
        self.comm_device = device if world.distributed and device.type == "cuda" else torch.device("cpu")
        self.flops = {"learner_scoring": 0 if self.uniform_draw else flops.scoring_step_flops(
                          cfg.model, self.draw, self.scoring_patch, self.sub_batch, cfg.method, self.uses_learner,
                          cache.manifest["embed_dim"] if cache else None),
                      "learner_training": flops.training_step_flops(cfg.model, self.sub_batch, cfg.train_patch_sizes)}
        self.dropped_seen = 0

    # what the method asks of a step, read from cfg (never stored beside it)
    @property
    def uniform_draw(self) -> bool:
        """Uniform and the offline filter draw the sub-batch itself: nothing is scored or selected."""
        return self.cfg.method in ("uniform", "offline-filter")

    @property
    def needs_reference(self) -> bool:
        """Selection scores with the reference's cached embeddings (every score but hard_learner)."""
        return not self.uniform_draw and self.cfg.score != "hard_learner"

    @property
    def uses_learner(self) -> bool:
        """Selection scores with the learner's own embeddings (every score but easy_reference)."""
        return self.cfg.score != "easy_reference"

    def __call__(self, net: torch.nn.Module, mine: list[dict[str, Any]], generator: torch.Generator) -> StepOutput:
        images_u8 = torch.stack([s["image"] for s in mine])  # [B / world, 3, H, W] uint8
        tokens = self.tokenizer([s["caption"] for s in mine])  # [B / world, L]
        kinds = gather_rows(torch.tensor([sample_kind(s["meta"]) for s in mine], dtype=torch.uint8,
                                         device=self.comm_device), self.world).cpu()  # [B]: an index into SAMPLE_KINDS
        stats = self.filter_stats()
        if self.uniform_draw:  # the drawn batch is the sub-batch: every rank trains on its own rows
            chosen = torch.arange(self.draw)
        else:
            learner, reference = self.score(images_u8, tokens, mine)
            chosen, selection_stats = self.select(learner, reference, generator)
            stats.update(selection_stats)
        stats.update(composition(kinds, chosen))
        loss, done = self.train(net, images_u8, tokens, chosen)
        return StepOutput(loss, self.sub_batch, self.flops, stats, backward_done=done)

    def filter_stats(self) -> dict[str, float]:
        """The offline filter's threshold, its drops since the last step and its kept share ({} without one)."""
        f = self.offline_filter
        if f is None:
            return {}
        dropped, self.dropped_seen = f.dropped - self.dropped_seen, f.dropped
        return {"offline_threshold": f.threshold, "offline_dropped": float(dropped),
                "offline_kept_fraction": f.kept / f.pool_size}

    def score(self, images_u8: Tensor, tokens: Tensor, mine: list[dict[str, Any]]) -> tuple[tuple | None, tuple | None]:
        """(learner, reference): each (image_emb [B', d], text_emb [B', d], logit_scale, logit_bias) or None when
        the score does not use it. B' is the super-batch B (global selection: gathered from every rank) or this
        rank's rows of it (local scope)."""
        cfg, model, device, world, comm = self.cfg, self.model, self.device, self.world, self.comm_device
        learner = reference = None
        if self.uses_learner:  # this rank scores its rows of the super-batch
            with torch.no_grad(), autocast(device, cfg.scoring_precision or cfg.precision):
                pixels = to_model_input(images_u8, device, cfg.model.mean, cfg.model.std)
                image_emb = model.encode_image(pixels, self.scoring_patch).float()
                text_emb = model.encode_text(tokens.to(device)).float()
            if not self.local_scope:  # global selection: every rank sees the whole super-batch's embeddings
                image_emb, text_emb = gather_rows(image_emb, world), gather_rows(text_emb, world)
            learner = (image_emb, text_emb, model.logit_scale.detach(), model.logit_bias.detach())
        if self.needs_reference:
            missing = [s["key"] for s in mine if "ref_image_emb" not in s]
            if missing:
                raise CacheError(f"samples {missing[:5]} have no reference-cache entry; re-run cache-reference")
            ref_image = torch.stack([s["ref_image_emb"] for s in mine]).to(comm)
            ref_text = torch.stack([s["ref_text_emb"] for s in mine]).to(comm)
            if not self.local_scope:
                ref_image, ref_text = gather_rows(ref_image, world), gather_rows(ref_text, world)
            reference = (ref_image.to(device).float(), ref_text.to(device).float(),
                         self.cache.logit_scale.to(device), self.cache.logit_bias.to(device))
        return learner, reference

    def select(self, learner, reference, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """(chosen [b] indices into the super-batch, on the host; selection statistics). Global scope: the same
        selection on every rank (the same embeddings, the same generator state); local: each rank picks its
        share within its own rows, from its own draws."""
        world, stats = self.world, {}
        t0 = time.perf_counter()
        if self.local_scope:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            local_generator = torch.Generator(device=self.device).manual_seed(seed + world.rank)
            picked, own = self.pick(learner, reference, self.sub_batch // world.size, local_generator)
            chosen = gather_rows(picked.to(self.comm_device) + self.scoring_rows.start, world).cpu()
            stats["score_selected_mean"] = own[picked].mean().item()
        else:
            chosen, own = self.pick(learner, reference, self.sub_batch, generator)
            stats["score_selected_mean"] = own[chosen].mean().item()
            chosen = chosen.cpu()
        stats["selection_seconds"] = time.perf_counter() - t0
        stats["score_superbatch_mean"] = own.mean().item()
        return chosen, stats

    def pick(self, learner, reference, n_select: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(chosen indices [n_select], own scores [B']) over the embeddings given."""
        cfg = self.cfg
        own = own_scores(cfg.score, learner, reference)  # [B']
        if cfg.method == "joint":  # Algorithm 1 without materialising the [B, B] score matrix
            return joint_select_from_embeddings(cfg.score, learner, reference, n_select, cfg.n_chunks, generator), own
        return independent_select(own, n_select, cfg.independent_mode, generator), own

    def train(self, net: torch.nn.Module, images_u8: Tensor, tokens: Tensor, chosen: Tensor) -> tuple[Tensor, bool]:
        """The training loss of the chosen rows (train_loss), this rank's share of them fetched from the ranks that
        decoded them (uint8 until here)."""
        cfg, device, world = self.cfg, self.device, self.world
        train_images = exchange_rows(images_u8.to(self.comm_device), chosen, world)  # [b / world, 3, H, W]
        train_tokens = exchange_rows(tokens.to(self.comm_device), chosen, world)  # [b / world, L]
        return train_loss(self.model, net, cfg, to_model_input(train_images, device, cfg.model.mean, cfg.model.std),
                          train_tokens.to(device), world, self.sub_batch, device)


def composition(kinds: Tensor, chosen: Tensor) -> dict[str, float]:
    """What a step drew and selected, by data.noise.SAMPLE_KINDS: the noisy share and each kind's share of each.
    kinds [B] (indices into SAMPLE_KINDS), chosen [b] (indices into the drawn batch)."""
    noisy = ~torch.isin(kinds, torch.tensor([SAMPLE_KINDS.index(k) for k in CLEAN_KINDS], dtype=kinds.dtype))
    return {"noisy_fraction_selected": noisy[chosen].float().mean().item(),
            "noisy_fraction_drawn": noisy.float().mean().item(),
            **kind_shares(kinds[chosen], "selected"), **kind_shares(kinds, "drawn")}


def train_learner(cfg: TrainLearnerConfig) -> TrainResult:
    """JEST / Flexi-JEST learner training on the pool (see the module docstring; distributed.py for several ranks):
    the reference's cache and the offline filter on the stream, then run_training over LearnerStep."""
    world, device, tokenizer = _prepare(cfg)
    model = build_model(cfg, device)
    offline = cfg.method == "offline-filter"  # uniform over the pool's top offline_keep_ratio by reference cosine
    prefilter = cfg.prefilter_keep_ratio is not None  # the offline filter first, then selection ('filter+jest')
    pool = resolve(cfg.pool)  # once: the cache is checked against, and the stream reads, the same shards
    cache = (ReferenceCache(cfg.reference_cache, pool, cfg.reference_sha256)
             if flops.uses_reference(cfg) else None)
    offline_filter = (OfflineFilter(cache, cfg.offline_keep_ratio) if offline
                      else OfflineFilter(cache, cfg.prefilter_keep_ratio) if prefilter else None)
    step = LearnerStep(cfg, model, tokenizer, device, world, cache, offline_filter)
    needs_reference = step.needs_reference  # the cache's embeddings join each sample
    check_divisible("super_batch_size", step.draw, world)
    check_divisible("the sub-batch (super_batch_size * (1 - filter_ratio))", step.sub_batch, world)
    if offline or (prefilter and not needs_reference):
        attach = offline_filter
    elif prefilter:
        def attach(shard_name: str, raws):  # kept samples only, with their reference embeddings
            return cache.attach(shard_name, offline_filter(shard_name, raws))
    else:
        attach = cache.attach if cache else None
    stream = build_loader(cfg, pool, cfg.data_mode, step.draw, world, attach)
    base = FlopsBreakdown(reference_training=cfg.reference_training_flops, reference_caching=cfg.reference_caching_flops
                          # the cosines, once, with the caching pass
                          + (offline_filter.flops if offline_filter else 0.0))
    if cache is None:
        base = FlopsBreakdown()
    name = f"learner[{cfg.method}{'' if step.uniform_draw else '/' + cfg.score}]"
    return run_training(cfg, model, stream, step, base, device, name, world)
