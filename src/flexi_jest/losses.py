"""Sigmoid (SigLIP) loss, per pair and summed, as JEST needs it, and a model's training loss over a batch.

For L2-normalised image embeddings x [B, d] and text embeddings y [B, d]:

    logits_ij = exp(t') * x_i . y_j + b
    z_ij      = +1 if i == j else -1
    L_ij      = -log sigmoid(z_ij * logits_ij)        # [B, B]
    loss      = sum_ij L_ij / B

The per-pair matrix is what JEST scores; the summed loss is what the learner trains on.
"""

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flexi_jest.distributed import World, gather_rows_with_grad, shard

LOGIT_SCALE_INIT = math.log(10.0)  # t' : temperature t = exp(t') = 10 at init (SigLIP)
LOGIT_BIAS_INIT = -10.0  # b


def pair_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """logits [Bi, Bt] = exp(logit_scale) * image_emb @ text_emb.T + logit_bias.

    image_emb [Bi, d] and text_emb [Bt, d] must already be L2-normalised (DualEncoder does this).
    The matmul accumulates in fp32 whatever the embeddings' dtype. Without autograd the scale and
    bias are applied in place (no extra [Bi, Bt] temporaries).
    """
    logits = image_emb.float() @ text_emb.float().T
    scale, bias = logit_scale.float().exp(), logit_bias.float()
    if torch.is_grad_enabled() and (logits.requires_grad or scale.requires_grad or bias.requires_grad):
        return logits * scale + bias
    return logits.mul_(scale).add_(bias)


def sigmoid_pair_losses(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor, row_offset: int = 0
) -> Tensor:
    """Per-pair SigLIP losses L [Bi, Bt]: L_ij = -log sigmoid(z_ij * logits_ij), z = +1 on positives, -1 elsewhere.

    image_emb [Bi, d], text_emb [Bt, d]: L2-normalised; image row i pairs with text row i + row_offset
    (row_offset lets a caller compute a block of rows of a larger matrix). Returns fp32.
    """
    logits = pair_logits(image_emb, text_emb, logit_scale, logit_bias)
    # -log sigmoid(-l) = softplus(l) for negatives; -log sigmoid(l) = softplus(l) - l for the positives,
    # which lie on the block's diagonal at offset row_offset: one elementwise pass, then a fix of B entries.
    losses = F.softplus(logits)
    losses.diagonal(row_offset).sub_(logits.diagonal(row_offset))
    return losses


def _block_loss_sum(rows: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor, row_offset: int) -> Tensor:
    return sigmoid_pair_losses(rows, text_emb, logit_scale, logit_bias, row_offset).sum()  # of a [c, B] block


def sigmoid_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    chunk_size: int | None = None,
    row_offset: int = 0,
    normalizer: int | None = None,
) -> Tensor:
    """The training loss sum_ij L_ij / B, a scalar.

    With chunk_size set, the [B, B] matrix is never materialised: image rows are processed
    chunk_size at a time ([chunk_size, B] logits at most), which bounds memory for large B. Under
    autograd each block is recomputed in the backward pass (activation checkpointing) so the
    backward is bounded the same way. Equal to sigmoid_pair_losses(...).sum() / B up to rounding.

    A block of rows of a larger batch (one rank's images against every rank's texts): image_emb
    [Bi, d] are rows row_offset.. of the batch, text_emb [B, d] all of its texts, and normalizer the
    batch size B; the block's share of the loss is returned, and the shares sum to the loss.
    """
    rows_total = image_emb.shape[0]
    batch = normalizer or text_emb.shape[0]
    if chunk_size is None or chunk_size >= rows_total:
        return sigmoid_pair_losses(image_emb, text_emb, logit_scale, logit_bias, row_offset).sum() / batch
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = image_emb.new_zeros((), dtype=torch.float32)
    for start in range(0, rows_total, chunk_size):
        rows = image_emb[start : start + chunk_size]
        offset = row_offset + start
        if torch.is_grad_enabled():
            block_sum = checkpoint(_block_loss_sum, rows, text_emb, logit_scale, logit_bias, offset,
                                   use_reentrant=False)
        else:
            block_sum = _block_loss_sum(rows, text_emb, logit_scale, logit_bias, offset)
        total = total + block_sum
    return total / batch


# ---- a model's training loss over a batch (the towers' forward included) ----------------------------------


def split_sizes(batch: int, parts: int) -> list[int]:
    return [batch // parts + (1 if i < batch % parts else 0) for i in range(parts)]


def patch_groups(batch: int, patch_sizes: list[int], rows: slice) -> list[int]:
    """How many of `rows` (a slice of a batch of `batch`, split evenly over patch_sizes by position)
    train at each patch size: a rank's share of a mixed-resolution batch, [count per patch size]."""
    counts, start = [], 0
    for size in split_sizes(batch, len(patch_sizes)):
        counts.append(max(0, min(start + size, rows.stop) - max(start, rows.start)))
        start += size
    return counts


def multi_patch_loss(
    model: torch.nn.Module, images: Tensor, tokens: Tensor, patch_sizes: list[int], loss_chunk_size: int | None = None,
    world: World = World(), batch: int | None = None, net: torch.nn.Module | None = None,
) -> Tensor:
    """Sigmoid loss of a batch whose images are split evenly over patch_sizes. images [b, 3, H, W], tokens [b, L].

    Distributed: images/tokens are this rank's rows shard(batch, world) of the batch; its images meet every
    rank's texts and the rank's share of the loss is returned (the shares sum to the batch's loss).
    model: a models.DualEncoder (its towers, logit_scale, logit_bias; not imported here: models/ imports this
    module). net: the module whose forward runs the towers (the DDP wrapper of model), default model."""
    batch = batch or images.shape[0]
    rows = shard(batch, world)
    image_emb, text_emb = (model if net is None else net)(images, tokens, patch_sizes,
                                                          patch_groups(batch, patch_sizes, rows))
    text_emb = gather_rows_with_grad(text_emb, world)
    return sigmoid_loss(image_emb, text_emb, model.logit_scale, model.logit_bias, loss_chunk_size,
                        row_offset=rows.start, normalizer=batch)


def accumulated_loss_backward(
    model: torch.nn.Module, images: Tensor, tokens: Tensor, patch_sizes: list[int], micro_batch: int,
    loss_chunk_size: int | None = None, autocast_context: Callable[[], Any] = contextlib.nullcontext,
    net: torch.nn.Module | None = None,
) -> Tensor:
    """The sigmoid loss of a batch of b pairs (images split evenly over patch_sizes, as multi_patch_loss),
    with its gradients accumulated into the model's parameters micro_batch pairs at a time; returns the
    loss (detached). images [b, 3, H, W], tokens [b, L].

    The SigLIP loss couples every image with every text, so it cannot be split by micro-batch: the
    embeddings of all micro-batches are computed first without grad, the loss over the whole batch gives
    the gradient of each embedding (and of the logit scale and bias), then each micro-batch's forward is
    recomputed with grad and back-propagates its embeddings' gradient (as open_clip's accum_freq does).
    The towers are deterministic (no dropout), so the gradients equal the single-batch ones."""
    batch = images.shape[0]
    forward = model if net is None else net
    slices = [slice(start, min(start + micro_batch, batch)) for start in range(0, batch, micro_batch)]

    def embed(rows: slice) -> tuple[Tensor, Tensor]:
        with autocast_context():
            return forward(images[rows], tokens[rows], patch_sizes, patch_groups(batch, patch_sizes, rows))

    with torch.no_grad():
        parts = [embed(rows) for rows in slices]
    image_emb = torch.cat([p[0] for p in parts]).float().requires_grad_()
    text_emb = torch.cat([p[1] for p in parts]).float().requires_grad_()
    loss = sigmoid_loss(image_emb, text_emb, model.logit_scale, model.logit_bias, loss_chunk_size)
    loss.backward()  # d loss / d embeddings; the scale's and bias's gradients, once
    for rows in slices:
        image_part, text_part = embed(rows)
        torch.autograd.backward([image_part, text_part],
                                [image_emb.grad[rows].to(image_part.dtype), text_emb.grad[rows].to(text_part.dtype)])
    return loss.detach()
