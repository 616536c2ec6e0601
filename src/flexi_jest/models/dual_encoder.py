"""The dual encoder: an open_clip CLIP model whose image tower takes the patch size per call (flexivit.py).

`DualEncoder.clip` is a plain open_clip model (CLIP, or CustomTextCLIP for the project's configs); its
state_dict has open_clip's keys, so model files load into open_clip and open_clip checkpoints load here.
"""

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from torch import Tensor, nn

from flexi_jest.config import ModelConfig
from flexi_jest.models import flexivit
from flexi_jest.models.configs import open_clip_config


def build_open_clip(cfg: ModelConfig) -> CLIP | CustomTextCLIP:
    """The open_clip model of cfg, as open_clip.create_model builds it from the same config (fp32, random init)."""
    model_cfg = open_clip_config(cfg)
    model_class = CustomTextCLIP if model_cfg.pop("custom_text", False) else CLIP
    model_cfg.pop("preprocess_cfg", None)
    return model_class(**model_cfg)


class DualEncoder(nn.Module):
    """Image and text towers mapping into one L2-normalised embedding space of size cfg.embed_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = build_open_clip(cfg)
        self.kernel_resampler = flexivit.kernel_resampler(self.clip.visual)

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        """t' (temperature t = exp(t'))."""
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.clip.logit_bias

    def patch_kernel(self, patch_size: int) -> Tensor:
        """The image tower's patch kernel [width, 3, p, p] at patch size p (PI-resized from the base)."""
        return flexivit.patch_kernel(self.clip.visual, self.kernel_resampler, patch_size)

    def image_features(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """images [B, 3, H, W] (normalised pixels) -> [B, embed_dim], not normalised."""
        return flexivit.image_features(self.clip.visual, self.kernel_resampler, images, patch_size)

    def encode_image(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """images [B, 3, H, W] (normalised pixels) -> [B, embed_dim], unit norm."""
        return F.normalize(self.image_features(images, patch_size), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """tokens [B, context_length] -> [B, embed_dim], unit norm."""
        return self.clip.encode_text(tokens, normalize=True)

    def forward(
        self, images: Tensor, tokens: Tensor, patch_size: int | list[int] | None = None,
        group_sizes: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(image_emb [B, d], text_emb [B, d]). With a list of patch sizes, consecutive groups of
        group_sizes images (which sum to B) are encoded at each patch size (Flexi-JEST's mixed training)."""
        if not isinstance(patch_size, list):
            return self.encode_image(images, patch_size), self.encode_text(tokens)
        if group_sizes is None or len(group_sizes) != len(patch_size) or sum(group_sizes) != images.shape[0]:
            raise ValueError(f"group_sizes {group_sizes} must give one count per patch size {patch_size}, "
                             f"summing to the batch {images.shape[0]}")
        parts = torch.split(images, group_sizes)
        image_emb = torch.cat([self.encode_image(part, patch) for part,
                               patch in zip(parts, patch_size) if part.shape[0]])
        return image_emb, self.encode_text(tokens)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
