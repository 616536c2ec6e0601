"""FlexiViT on open_clip's VisionTransformer: one set of weights, the patch size chosen per forward call.

The patch-embedding kernel (visual.conv1) stays at the tower's base patch size and is resampled to the
requested size by pseudo-inverse resize (PI-resize, FlexiViT; timm's PatchEmbedResamplerFixedOrigSize,
which caches the resampling matrix per size): for an upsampling resize R, the resampled kernel w'
satisfies <R x, w'> = <x, w> for every patch x, so a patch resized with the image keeps its token. The
position embeddings (class token's kept) are stored on the base grid and resized to the call's token
grid with timm's resample_abs_pos_embed. At the base patch size this is exactly open_clip's forward.
"""

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize
from torch import Tensor


def kernel_resampler(visual: VisionTransformer) -> PatchEmbedResamplerFixedOrigSize:
    """timm's cached PI-resize from the tower's base patch size."""
    return PatchEmbedResamplerFixedOrigSize(tuple(visual.patch_size))


def patch_kernel(visual: VisionTransformer, resampler: PatchEmbedResamplerFixedOrigSize, patch_size: int) -> Tensor:
    """The patch kernel [width, 3, p, p] for patch size p: the stored one at the base size, else its PI-resize."""
    if (patch_size, patch_size) == tuple(visual.patch_size):
        return visual.conv1.weight
    return resampler(visual.conv1.weight, [patch_size, patch_size])


def embed_patches(visual: VisionTransformer, resampler: PatchEmbedResamplerFixedOrigSize, images: Tensor,
                  patch_size: int) -> Tensor:
    """images [B, 3, H, W] -> tokens [B, 1 + (H/p)*(W/p), width]: class token first, position embeddings
    added (resized from the base grid), patch dropout and ln_pre applied, as open_clip's _embeds does."""
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {height}x{width}")
    x = F.conv2d(images, patch_kernel(visual, resampler, patch_size), visual.conv1.bias, stride=patch_size)
    grid = list(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    if grid != list(visual.grid_size):
        pos = resample_abs_pos_embed(pos.unsqueeze(0), grid, old_size=list(visual.grid_size), num_prefix_tokens=1)[0]
    x = x + pos.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def image_features(visual: VisionTransformer, resampler: PatchEmbedResamplerFixedOrigSize, images: Tensor,
                   patch_size: int | None = None) -> Tensor:
    """images [B, 3, H, W] -> features [B, output_dim] (not normalised) at patch_size (default: the base)."""
    tokens = embed_patches(visual, resampler, images, patch_size or visual.patch_size[0])
    pooled, _ = visual._pool(visual.transformer(tokens))  # open_clip's own pooling (tok / avg, ln_post)
    return pooled @ visual.proj if visual.proj is not None else pooled
