"""Zero-shot evaluation: classification with prompt templates, and image<->text retrieval.

Classification: each class's text embedding is the normalised mean of its prompts' embeddings;
an image's prediction is the nearest class. Needs the split's `classes` and `templates` (in its
manifest) and a `label` per sample.

Completeness: metrics feed promotion, so a split with any unreadable sample or shard (missing,
truncated, corrupt, undecodable image, blank or non-UTF-8 caption) fails the evaluation with its read
stats, unless allow_partial; then each split's result carries the read stats and the shortfall.

Retrieval: over the N pairs of a split. Generated captions repeat (two scenes can share one), so a
retrieved item counts as a hit when its caption equals the query's caption, not only when it is the
query's own partner.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flexi_jest import storage
from flexi_jest.checkpoint import load_model
from flexi_jest.config import EvaluateConfig, EvaluateResult, SplitMetrics
from flexi_jest.data.shards import PartialReadError, ReadStats, iter_split, read_manifest
from flexi_jest.model import DualEncoder, Tokenizer
from flexi_jest.device import autocast, resolve_device, to_model_input


@torch.no_grad()
def embed_split(
    model: DualEncoder, tokenizer: Tokenizer, split_dir: str, patch_size: int | None, batch_size: int,
    device: torch.device, max_samples: int | None = None, allow_partial: bool = False,
) -> dict[str, Any]:
    """Embeddings of a split: {image_emb [N, d], text_emb [N, d], captions, labels, stats}.

    A PartialReadError if reading skipped anything, unless allow_partial."""
    model.eval()
    stats = ReadStats()
    image_embs, text_embs, captions, labels = [], [], [], []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        images = to_model_input(torch.stack([s["image"] for s in batch]), device)
        tokens = tokenizer([s["caption"] for s in batch]).to(device)
        with autocast(device):
            image_embs.append(model.encode_image(images, patch_size).float().cpu())
            text_embs.append(model.encode_text(tokens).float().cpu())
        captions.extend(s["caption"] for s in batch)
        labels.extend(s["meta"].get("label") for s in batch)
        batch.clear()

    for count, sample in enumerate(iter_split(split_dir, model.cfg.image_size, stats), start=1):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
        if max_samples is not None and count >= max_samples:
            break  # before the reader decodes (and counts) a sample not scored
    if batch:
        flush()
    if not captions:
        raise PartialReadError(f"no readable samples in eval split {split_dir}: {stats.summary()}")
    if not stats.complete and not allow_partial:
        raise PartialReadError(
            f"eval split {split_dir} is not wholly readable: {stats.summary()}; first problems: {stats.errors[:5]}. "
            "Scores on part of it would be misleading: repair or rewrite the split, or set allow_partial: true "
            "to score the readable part (the shortfall is then in the result)")
    return {"image_emb": torch.cat(image_embs), "text_emb": torch.cat(text_embs), "captions": captions,
            "labels": labels, "stats": stats}


@torch.no_grad()
def zero_shot_classifier(
    model: DualEncoder, tokenizer: Tokenizer, classes: list[str], templates: list[str], device: torch.device
) -> Tensor:
    """Class embeddings [C, d]: the normalised mean over templates of each class's prompt embeddings."""
    model.eval()
    weights = []
    for name in classes:
        prompts = tokenizer([template.format(name) for template in templates]).to(device)
        weights.append(F.normalize(model.encode_text(prompts).float().mean(0), dim=-1))
    return torch.stack(weights).cpu()


def classification_accuracy(image_emb: Tensor, labels: Tensor, classifier: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy. image_emb [N, d], labels [N] (class indices), classifier [C, d]."""
    logits = image_emb @ classifier.T  # [N, C]
    ranked = logits.topk(min(max(ks), classifier.shape[0]), dim=1).indices  # [N, k]
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, captions: list[str], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways. image_emb, text_emb [N, d]; a hit is an item whose caption equals the query's."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[c] for c in captions])  # [N]
    similarity = image_emb @ text_emb.T  # [N images, N texts]
    k_max = min(max(ks), len(captions))
    out = {}
    for direction, sim in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranked = sim.topk(k_max, dim=1).indices  # [N, k]
        hits = caption_ids[ranked] == caption_ids[:, None]
        for k in ks:
            out[f"{direction}_r{k}"] = hits[:, :k].any(dim=1).float().mean().item()
    return out


def evaluate_model(
    model: DualEncoder, eval_splits: list[str], patch_size: int | None = None, batch_size: int = 256,
    device: torch.device | None = None, max_samples: int | None = None, allow_partial: bool = False,
) -> dict[str, SplitMetrics]:
    """Zero-shot classification and retrieval on each eval split; keys are the splits' dataset names.

    A split that cannot be read whole raises PartialReadError unless allow_partial (see the module doc)."""
    device = device or next(model.parameters()).device
    tokenizer = Tokenizer(model.cfg.context_length)
    results: dict[str, SplitMetrics] = {}
    for split_dir in eval_splits:
        manifest = read_manifest(split_dir) or {}
        embedded = embed_split(model, tokenizer, split_dir, patch_size, batch_size, device, max_samples, allow_partial)
        stats: ReadStats = embedded["stats"]
        classes, templates = manifest.get("classes"), manifest.get("templates") or ["{}"]
        metrics: dict[str, float | None] = {"top1": None, "top5": None}  # None: the split has no classes
        if classes and all(label in classes for label in embedded["labels"]):
            classifier = zero_shot_classifier(model, tokenizer, classes, templates, device)
            labels = torch.tensor([classes.index(label) for label in embedded["labels"]])
            metrics.update(classification_accuracy(embedded["image_emb"], labels, classifier))
        metrics.update(retrieval_recall(embedded["image_emb"], embedded["text_emb"], embedded["captions"]))
        name = manifest.get("dataset") or split_dir.rstrip("/").split("/")[-2]
        scored = len(embedded["captions"])
        expected = None
        if manifest:
            expected = sum(s["num_samples"] for s in manifest["shards"])
            expected = min(expected, max_samples) if max_samples is not None else expected
        shortfall = max(0, expected - scored) if expected is not None else stats.lost_samples()
        results[name] = SplitMetrics(num_samples=scored, num_classes=len(classes or []), **metrics,
                                     read_stats=stats.to_summary(), expected_samples=expected, shortfall=shortfall)
    return results


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """The evaluate stage: load a model file and evaluate it on every eval split."""
    device = resolve_device(cfg.device)
    model, _ = load_model(cfg.model, device)
    splits = evaluate_model(model, cfg.eval_data, cfg.patch_size, cfg.batch_size, device, cfg.max_samples,
                            cfg.allow_partial)
    result = EvaluateResult(model=cfg.model, splits=splits)
    if cfg.out_path:
        storage.write_bytes(cfg.out_path, result.model_dump_json(indent=1).encode())
    return result
