"""Zero-shot evaluation on named eval sets: classification with prompt templates, and image<->text retrieval.

The eval sets (flexi_jest.data.eval_sets reads their layouts: the project's splits, CLIP_benchmark's
webdataset layout, img2dataset-style tars, ImageFolders) are each reported under their own name.

Classification: each class's text embedding is the normalised mean of its prompts' embeddings; an
image's prediction is the nearest class. Needs class names and a label per sample; a set without labels
reports retrieval only, with `classification_skipped` saying why.

Retrieval: images against all captions (an image may have several, as CLIP_benchmark's retrieval sets
do). Generated captions repeat (two scenes can share one), so a retrieved item counts as a hit when its
caption is one of the query image's captions, not only when it is the query's own partner. A set without
captions (an ImageFolder) reports classification only, with `retrieval_skipped` saying why.

Completeness: metrics feed promotion, so a set with any unreadable sample or shard (missing,
truncated, corrupt, undecodable image, blank or non-UTF-8 caption) fails the evaluation with its read
stats, unless allow_partial; then each set's result carries the read stats and the shortfall.

The metrics agree with CLIP_benchmark's (`zeroshot_classification.evaluate`, `zeroshot_retrieval.evaluate`)
on the same model and data: tests/test_eval_sets.py checks it.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flexi_jest import storage
from flexi_jest.checkpoint import load_model
from flexi_jest.config import EvalSet, EvaluateConfig, EvaluateResult, SplitMetrics
from flexi_jest.data.eval_sets import (
    CLASSNAMES_FILE,
    EvalSample,
    EvalSetError,
    OpenedEvalSet,
    assign_names,
    fill_template,
    open_eval_set,
)
from flexi_jest.data.shards import PartialReadError, ReadStats
from flexi_jest.data.transforms import ImageTransform
from flexi_jest.device import autocast, resolve_device, to_model_input
from flexi_jest.finite import check_embeddings_finite
from flexi_jest.models import DualEncoder, Tokenizer


@torch.no_grad()
def embed_eval_set(
    model: DualEncoder, tokenizer: Tokenizer, eval_set: OpenedEvalSet, patch_size: int | None, batch_size: int,
    device: torch.device, max_samples: int | None = None, allow_partial: bool = False,
) -> dict[str, Any]:
    """Embeddings of an eval set: {image_emb [N, d], text_emb [T, d], text_image [T] (each caption's image),
    captions [T], labels [N] (index, class name or None), stats}. An image may have no caption or several.

    A PartialReadError if reading skipped anything, unless allow_partial."""
    model.eval()
    stats = ReadStats()
    image_embs, text_embs, captions, text_image, labels = [], [], [], [], []
    batch: list[EvalSample] = []

    def flush() -> None:
        images = to_model_input(torch.stack([s.image for s in batch]), device, model.cfg.mean, model.cfg.std)
        with autocast(device):
            image_embs.append(model.encode_image(images, patch_size).float().cpu())
        texts = [(len(labels) + i, caption) for i, s in enumerate(batch) for caption in s.captions]
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            tokens = tokenizer([caption for _, caption in chunk]).to(device)
            with autocast(device):
                text_embs.append(model.encode_text(tokens).float().cpu())
            text_image.extend(index for index, _ in chunk)
            captions.extend(caption for _, caption in chunk)
        labels.extend(s.label for s in batch)
        batch.clear()

    transform = ImageTransform(model.cfg.image_size)  # open_clip's: shorter side resized, centre crop
    for count, sample in enumerate(eval_set.samples(transform, stats), start=1):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
        if max_samples is not None and count >= max_samples:
            break  # before the reader decodes (and counts) a sample not scored
    if batch:
        flush()
    if not labels:
        raise PartialReadError(f"no readable samples in eval set {eval_set.uri}: {stats.summary()}")
    if not stats.complete and not allow_partial:
        raise PartialReadError(
            f"eval split {eval_set.uri} is not wholly readable: {stats.summary()}; first problems: {stats.errors[:5]}. "
            "Scores on part of it would be misleading: repair or rewrite the split, or set allow_partial: true "
            "to score the readable part (the shortfall is then in the result)")
    dim = image_embs[0].shape[1]
    return {"image_emb": torch.cat(image_embs), "text_emb": torch.cat(text_embs) if text_embs else torch.empty(0, dim),
            "text_image": torch.tensor(text_image, dtype=torch.long), "captions": captions, "labels": labels,
            "stats": stats}


@torch.no_grad()
def zero_shot_classifier(
    model: DualEncoder, tokenizer: Tokenizer, classes: list[str], templates: list[str], device: torch.device,
    batch_size: int = 1024,
) -> Tensor:
    """Class embeddings [C, d]: the normalised mean over templates of each class's prompt embeddings.
    A template holds `{c}` (CLIP_benchmark's) or `{}` where the class name goes. The C x len(templates)
    prompts are encoded batch_size at a time."""
    model.eval()
    prompts = [fill_template(template, name) for name in classes for template in templates]  # class-major
    embeddings = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        embeddings.append(model.encode_text(tokens).float().cpu())
    per_class = torch.cat(embeddings).view(len(classes), len(templates), -1)  # [C, templates, d]
    return F.normalize(per_class.mean(1), dim=-1)


def classification_accuracy(image_emb: Tensor, labels: Tensor, classifier: Tensor,
                            ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy. image_emb [N, d], labels [N] (class indices), classifier [C, d]."""
    logits = image_emb @ classifier.T  # [N, C]
    ranked = logits.topk(min(max(ks), classifier.shape[0]), dim=1).indices  # [N, k]
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def mean_per_class_recall(image_emb: Tensor, labels: Tensor, classifier: Tensor) -> float:
    """Top-1 recall of each class present in labels, averaged over those classes (balanced accuracy).
    image_emb [N, d], labels [N], classifier [C, d]."""
    correct = ((image_emb @ classifier.T).argmax(dim=1) == labels).float()  # [N]
    present = labels.unique()
    recalls = torch.stack([correct[labels == c].mean() for c in present])
    return recalls.mean().item()


def retrieval_recall(
    image_emb: Tensor, text_emb: Tensor, captions: list[str], ks: tuple[int, ...] = (1, 5, 10),
    text_image: Tensor | None = None, chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways (CLIP's: a query scores 1 if any of its top k is a match).

    image_emb [N, d]; text_emb [T, d], captions [T]; text_image [T]: the image each text belongs to (default:
    text i to image i, N == T). A text matches an image when its caption is one of the image's captions, so a
    caption repeated on another image (generated captions repeat) is a hit too. Queries go in chunks of rows,
    so memory is O(chunk x (N + T))."""
    num_texts = len(captions)
    text_image = torch.arange(num_texts) if text_image is None else text_image
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[c] for c in captions], dtype=torch.long)  # [T]
    positives = torch.unique(text_image * len(ids) + caption_ids)  # (image, caption) pairs that match
    out: dict[str, float] = {}

    def recall(queries: Tensor, keys: Tensor, pair_key) -> list[Tensor]:
        k_max = min(max(ks), keys.shape[0])
        hits = []
        for start in range(0, queries.shape[0], chunk):
            ranked = (queries[start:start + chunk] @ keys.T).topk(k_max, dim=1).indices  # [n, k]
            hits.append(torch.isin(pair_key(torch.arange(start, start + ranked.shape[0])[:, None], ranked), positives))
        return torch.cat(hits)

    image_hits = recall(image_emb, text_emb, lambda image, text: image * len(ids) + caption_ids[text])
    text_hits = recall(text_emb, image_emb, lambda text, image: image * len(ids) + caption_ids[text])
    for direction, hits in (("image_to_text", image_hits), ("text_to_image", text_hits)):
        for k in ks:
            out[f"{direction}_r{k}"] = hits[:, :k].any(dim=1).float().mean().item()
    return out


def class_indices(eval_set: OpenedEvalSet, labels: list[int | str | None]) -> tuple[Tensor | None, str | None]:
    """(labels as class indices [N], None), or (None, why classification cannot run on this set).
    Labels that do not fit the set's class names are bad data: an EvalSetError naming the sample."""
    classes = eval_set.classnames
    unlabelled = sum(label is None for label in labels)
    if unlabelled == len(labels):
        where = {"imagefolder": "", "flexi-jest": " (no 'label' in their .json)"}.get(
            eval_set.layout, " (no .cls member and no 'label' in their .json)")
        return None, f"the samples carry no labels{where}: retrieval only"
    if not classes:
        return None, (f"labels but no class names: give the set a classnames file (one name a line, in label "
                      f"order) or put {CLASSNAMES_FILE} beside its data")
    if unlabelled:
        raise EvalSetError(f"eval set {eval_set.uri!r}: {unlabelled} of {len(labels)} samples have no label")
    index = {name: i for i, name in enumerate(classes)}
    out = []
    for position, label in enumerate(labels):
        value = index.get(label) if isinstance(label, str) else label
        if value is None or not 0 <= value < len(classes):
            raise EvalSetError(f"eval set {eval_set.uri!r}: sample {position}'s label {label!r} is not one of its "
                               f"{len(classes)} classes ({eval_set.classnames_source})")
        out.append(value)
    return torch.tensor(out, dtype=torch.long), None


def score_eval_set(model: DualEncoder, tokenizer: Tokenizer, eval_set: OpenedEvalSet, embedded: dict[str, Any],
                   device: torch.device, **details: Any) -> SplitMetrics:
    """Classification (needs labels and class names) and retrieval (needs a caption on every image) of an
    embedded eval set; whichever cannot run says why. details: more SplitMetrics fields (read stats...)."""
    num_images = embedded["image_emb"].shape[0]
    metrics: dict[str, Any] = {}
    labels, metrics["classification_skipped"] = class_indices(eval_set, embedded["labels"])
    if labels is not None:
        classifier = zero_shot_classifier(model, tokenizer, eval_set.classnames, eval_set.templates, device)
        check_embeddings_finite(classifier, f"the model on eval set {eval_set.uri}, class-prompt embeddings")
        metrics.update(classification_accuracy(embedded["image_emb"], labels, classifier))
        metrics["mean_per_class_recall"] = mean_per_class_recall(embedded["image_emb"], labels, classifier)
    captioned = int(torch.unique(embedded["text_image"]).numel())
    if captioned == num_images:
        metrics.update(retrieval_recall(embedded["image_emb"], embedded["text_emb"], embedded["captions"],
                                        text_image=embedded["text_image"]))
    elif captioned == 0:
        metrics["retrieval_skipped"] = ("an ImageFolder has no captions" if eval_set.layout == "imagefolder"
                                        else "the samples carry no captions (.txt): classification only")
    else:
        metrics["retrieval_skipped"] = f"{num_images - captioned} of {num_images} images have no caption (.txt)"
    return SplitMetrics(uri=eval_set.uri, layout=eval_set.layout, num_samples=num_images,
                        num_classes=len(eval_set.classnames or []), num_texts=len(embedded["captions"]), **metrics,
                        **details)


def evaluate_model(
    model: DualEncoder, eval_sets: list[str | EvalSet], patch_size: int | None = None, batch_size: int = 256,
    device: torch.device | None = None, max_samples: int | None = None, allow_partial: bool = False,
    model_name: str = "the model",
) -> dict[str, SplitMetrics]:
    """Zero-shot classification and retrieval on each eval set ('name=uri', 'uri' or EvalSet), keyed by its
    name (given, or derived from its path and unique in the call: flexi_jest.data.eval_sets.assign_names).

    A set that cannot be read whole raises PartialReadError unless allow_partial (see the module doc). Embeddings
    with a NaN or an infinity (a diverged model) raise NonFiniteError naming model_name and the set: top-k over
    NaN logits still gives plausible numbers."""
    device = device or next(model.parameters()).device
    tokenizer = Tokenizer(model.cfg)
    opened = [open_eval_set(EvalSet.parse(item)) for item in eval_sets]
    results: dict[str, SplitMetrics] = {}
    for name, eval_set in zip(assign_names(opened), opened):
        embedded = embed_eval_set(model, tokenizer, eval_set, patch_size, batch_size, device, max_samples,
                                  allow_partial)
        for kind in ("image", "text"):
            check_embeddings_finite(embedded[f"{kind}_emb"], f"{model_name} on eval set {name!r} ({eval_set.uri}), "
                                                             f"{kind} embeddings")
        stats: ReadStats = embedded["stats"]
        scored = embedded["image_emb"].shape[0]
        expected = eval_set.expected_samples  # the manifest's, img2dataset's stats, an ImageFolder's images
        if expected is not None and max_samples is not None:
            expected = min(expected, max_samples)
        shortfall = max(0, expected - scored) if expected is not None else stats.lost_samples()
        results[name] = score_eval_set(model, tokenizer, eval_set, embedded, device, read_stats=stats.to_summary(),
                                       expected_samples=expected, shortfall=shortfall)
    return results


def champion(result: EvaluateResult, metric: str | None = None) -> tuple[str, float]:
    """The metric promotion compares and its value: `metric` ('<set>.<field>'), else the first set's top1
    (its image_to_text_r1 when it has no labels). A metric the result lacks is a ValueError saying why."""
    if metric is None:
        name, split = next(iter(result.splits.items()))
        metric = f"{name}.top1" if split.top1 is not None else f"{name}.image_to_text_r1"
    name, _, field = metric.rpartition(".")
    if name not in result.splits:
        raise ValueError(
            f"champion_metric {metric!r}: no eval set named {name!r}; the sets are {sorted(result.splits)}")
    split = result.splits[name]
    if field not in SplitMetrics.model_fields:
        raise ValueError(f"champion_metric {metric!r}: no metric {field!r}; e.g. top1, top5, mean_per_class_recall, "
                         "image_to_text_r1, text_to_image_r1")
    value = getattr(split, field)
    if value is None or isinstance(value, str) or field in ("num_samples", "num_classes", "num_texts"):
        skipped = split.classification_skipped if field in ("top1", "top5",
                                                            "mean_per_class_recall") else split.retrieval_skipped
        raise ValueError(f"champion_metric {metric!r}: {name} has no {field}" + (f" ({skipped})" if skipped else ""))
    return metric, float(value)


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """The evaluate stage: load a model file and evaluate it on every eval set; names the champion metric."""
    device = resolve_device(cfg.device)
    model, _ = load_model(cfg.model, device)
    splits = evaluate_model(model, cfg.eval_data, cfg.patch_size, cfg.batch_size, device, cfg.max_samples,
                            cfg.allow_partial, model_name=f"model {cfg.model}")
    result = EvaluateResult(model=cfg.model, splits=splits)
    result.champion_metric, result.champion_value = champion(result, cfg.champion_metric)
    if cfg.out_path:
        storage.write_bytes(cfg.out_path, result.model_dump_json(indent=1).encode())
    return result
