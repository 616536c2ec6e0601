"""Sigmoid (SigLIP) loss, per pair and summed, as JEST needs it.

For L2-normalised image embeddings x [B, d] and text embeddings y [B, d]:

    logits_ij = exp(t') * x_i . y_j + b
    z_ij      = +1 if i == j else -1
    L_ij      = -log sigmoid(z_ij * logits_ij)        # [B, B]
    loss      = sum_ij L_ij / B

The per-pair matrix is what JEST scores; the summed loss is what the learner trains on.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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
