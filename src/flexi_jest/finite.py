"""Finiteness: a diverged model (NaN or infinite weights or embeddings) is refused where it would otherwise pass for
a trained one: at the end of training, at evaluation (top-k over NaN logits still gives plausible numbers) and in
promotion (flexi_jest.registry.promote).

    check_model_finite(model, "reference run runs/ref")   # weights, then the embeddings of a fixed probe batch
    check_embeddings_finite(image_emb, "model m.pt on eval set shapes (images)")
"""

import torch
from torch import Tensor

from flexi_jest.models import DualEncoder

DIVERGED = "the run diverged: lower optim.lr (or set optim.grad_clip) and train again"


class NonFiniteError(FloatingPointError):
    """A model's weights or embeddings, or a metric, hold NaN or an infinity; the message names the model and where."""


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of module's parameters that hold a NaN or an infinity (buffers are left out: an attention mask holds
    -inf by design)."""
    return [name for name, tensor in module.named_parameters() if not torch.isfinite(tensor).all()]


def count_non_finite_rows(embeddings: Tensor) -> int:
    """Rows of embeddings [N, d] with a NaN or an infinity."""
    return int((~torch.isfinite(embeddings)).any(dim=-1).sum()) if embeddings.numel() else 0


def check_embeddings_finite(embeddings: Tensor, what: str) -> None:
    """NonFiniteError naming `what` if any row of embeddings [N, d] holds a NaN or an infinity."""
    bad = count_non_finite_rows(embeddings)
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {embeddings.shape[0]} embeddings hold NaN or infinite values, so "
                             "its scores would be no measurement; refusing to score it (was its training diverged?)")


@torch.no_grad()
def probe_embeddings(model: DualEncoder, patch_sizes: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """The model's embeddings of a fixed probe batch: 2 noise images at each patch size ([2 x len(patch_sizes), d])
    and 2 random token sequences ([2, d]); the model's train/eval mode is left as it was."""
    cfg = model.cfg
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=generator).to(device)
    tokens = torch.randint(1, cfg.vocab_size, (2, cfg.context_length), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        image_emb = torch.cat([model.encode_image(images, size).float() for size in (patch_sizes or [None])])
        text_emb = model.encode_text(tokens).float()
    finally:
        model.train(was_training)
    return image_emb, text_emb


def check_model_finite(model: DualEncoder, what: str, patch_sizes: list[int] | None = None) -> None:
    """NonFiniteError naming `what` if the model's weights, or its embeddings of the probe batch (probe_embeddings,
    at patch_sizes), hold a NaN or an infinity: weights of 1e30 are finite, their embeddings are not."""
    bad = non_finite_parameters(model)
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} weight tensors hold NaN or infinite values ({', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}); {DIVERGED}")
    image_emb, text_emb = probe_embeddings(model, patch_sizes)
    if count_non_finite_rows(image_emb) or count_non_finite_rows(text_emb):
        largest = max(float(p.detach().abs().max()) for p in model.parameters())
        raise NonFiniteError(f"{what}: its weights are finite (largest magnitude {largest:.3g}) but its embeddings "
                             f"of a probe batch hold NaN or infinite values; {DIVERGED}")
