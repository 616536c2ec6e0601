"""The SigLIP dual encoder: a FlexiViT image tower, open_clip's text tower, a learnable scale and bias."""

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from flexi_jest.config import ModelConfig
from flexi_jest.flexivit import FlexiViT
from flexi_jest.losses import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT


class DualEncoder(nn.Module):
    """Image and text towers mapping into one L2-normalised embedding space of size cfg.embed_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = FlexiViT(
            image_size=cfg.image_size,
            base_patch_size=cfg.patch_size,
            width=cfg.vision_width,
            depth=cfg.vision_depth,
            heads=cfg.vision_heads,
            output_dim=cfg.embed_dim,
        )
        self.text = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.text_width,
            heads=cfg.text_heads,
            layers=cfg.text_depth,
            output_dim=cfg.embed_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))  # t' (temperature t = exp(t'))
        self.logit_bias = nn.Parameter(torch.tensor(LOGIT_BIAS_INIT))

    def encode_image(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """images [B, 3, H, W] (normalised pixels) -> [B, embed_dim], unit norm."""
        return F.normalize(self.visual(images, patch_size), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """tokens [B, context_length] -> [B, embed_dim], unit norm."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(
        self, images: Tensor, tokens: Tensor, patch_size: int | list[int] | None = None, group_sizes: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(image_emb [B, d], text_emb [B, d]). With a list of patch sizes, consecutive groups of
        group_sizes images (which sum to B) are encoded at each patch size (Flexi-JEST's mixed training)."""
        if not isinstance(patch_size, list):
            return self.encode_image(images, patch_size), self.encode_text(tokens)
        if group_sizes is None or len(group_sizes) != len(patch_size) or sum(group_sizes) != images.shape[0]:
            raise ValueError(f"group_sizes {group_sizes} must give one count per patch size {patch_size}, "
                             f"summing to the batch {images.shape[0]}")
        parts = torch.split(images, group_sizes)
        image_emb = torch.cat([self.encode_image(part, patch) for part, patch in zip(parts, patch_size) if part.shape[0]])
        return image_emb, self.encode_text(tokens)


class Tokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships with the package) at the model's context length."""

    def __init__(self, context_length: int):
        self._tokenizer = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._tokenizer.encoder)

    def __call__(self, texts: list[str]) -> Tensor:
        """list of B strings -> LongTensor [B, context_length] (truncated, end-of-text kept)."""
        return self._tokenizer(texts)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
