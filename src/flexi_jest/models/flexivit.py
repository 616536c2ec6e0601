"""FlexiViT on open_clip's image towers: one set of weights, the patch size chosen per forward call.

Two towers: open_clip's VisionTransformer, and open_clip's TimmModel around a timm VisionTransformer trunk
(SigLIP's: no class token, MAP pooling; open_clip_names.timm_trunk_problems says which trunks qualify).
The patch-embedding kernel (visual.conv1, or trunk.patch_embed.proj) stays at the tower's base patch size
and is resampled to the requested size by pseudo-inverse resize (PI-resize, FlexiViT; timm's
PatchEmbedResamplerFixedOrigSize, which caches the resampling matrix per size): for an upsampling resize R,
the resampled kernel w' satisfies <R x, w'> = <x, w> for every patch x, so a patch resized with the image
keeps its token. The position embeddings (class token's kept) are stored on the base grid and resized to
the call's token grid with timm's resample_abs_pos_embed. At the base patch size this is exactly the
tower's own forward (open_clip's VisionTransformer.forward, or TimmModel.forward).
"""

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.layers import resample_abs_pos_embed
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize
from timm.models import checkpoint_seq
from torch import Tensor, nn

ImageTower = VisionTransformer | TimmModel


def patch_embedding(visual: ImageTower) -> nn.Conv2d:
    """The tower's patch-embedding convolution (kernel [width, 3, p, p] at the base patch size p)."""
    return visual.trunk.patch_embed.proj if isinstance(visual, TimmModel) else visual.conv1


def base_patch_size(visual: ImageTower) -> int:
    """The patch size the tower's kernel is stored at."""
    return patch_embedding(visual).kernel_size[0]


def kernel_resampler(visual: ImageTower) -> PatchEmbedResamplerFixedOrigSize:
    """timm's cached PI-resize from the tower's base patch size."""
    return PatchEmbedResamplerFixedOrigSize(tuple(patch_embedding(visual).kernel_size))


def patch_kernel(visual: ImageTower, resampler: PatchEmbedResamplerFixedOrigSize, patch_size: int) -> Tensor:
    """The patch kernel [width, 3, p, p] for patch size p: the stored one at the base size, else its PI-resize."""
    weight = patch_embedding(visual).weight
    if patch_size == base_patch_size(visual):
        return weight
    return resampler(weight, [patch_size, patch_size])


def _patchify(visual: ImageTower, resampler: PatchEmbedResamplerFixedOrigSize, images: Tensor,
              patch_size: int) -> tuple[Tensor, list[int]]:
    """images [B, 3, H, W] -> (patch tokens [B, (H/p)*(W/p), width], token grid [H/p, W/p])."""
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {height}x{width}")
    conv = patch_embedding(visual)
    x = F.conv2d(images, patch_kernel(visual, resampler, patch_size), conv.bias, stride=patch_size)
    return x.flatten(2).transpose(1, 2), list(x.shape[-2:])


def embed_patches(visual: VisionTransformer, resampler: PatchEmbedResamplerFixedOrigSize, images: Tensor,
                  patch_size: int) -> Tensor:
    """open_clip's ViT: images [B, 3, H, W] -> tokens [B, 1 + (H/p)*(W/p), width]: class token first,
    position embeddings added (resized from the base grid), patch dropout and ln_pre applied, as open_clip's
    _embeds does."""
    x, grid = _patchify(visual, resampler, images, patch_size)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    if grid != list(visual.grid_size):
        pos = resample_abs_pos_embed(pos.unsqueeze(0), grid, old_size=list(visual.grid_size), num_prefix_tokens=1)[0]
    x = x + pos.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def embed_patches_timm(visual: TimmModel, resampler: PatchEmbedResamplerFixedOrigSize, images: Tensor,
                       patch_size: int) -> Tensor:
    """A timm VisionTransformer trunk: images [B, 3, H, W] -> tokens [B, prefix + (H/p)*(W/p), width]: the
    class and register tokens (if any) first, position embeddings added (resized from the base grid; with
    or without entries for the prefix tokens, no_embed_class), then pos_drop, patch_drop and norm_pre, as
    timm's PatchEmbed, _pos_embed and forward_features do."""
    trunk = visual.trunk
    x, grid = _patchify(visual, resampler, images, patch_size)
    x = trunk.patch_embed.norm(x)
    prefix = [token.expand(x.shape[0], -1, -1) for token in (trunk.cls_token, trunk.reg_token) if token is not None]
    pos = trunk.pos_embed
    if pos is not None and grid != list(trunk.patch_embed.grid_size):
        pos = resample_abs_pos_embed(pos, grid, old_size=list(trunk.patch_embed.grid_size),
                                     num_prefix_tokens=0 if trunk.no_embed_class else trunk.num_prefix_tokens)
    if pos is None:  # timm skips pos_drop too
        x = torch.cat(prefix + [x], dim=1)
    elif trunk.no_embed_class:
        x = trunk.pos_drop(torch.cat(prefix + [x + pos], dim=1))
    else:
        x = trunk.pos_drop(torch.cat(prefix + [x], dim=1) + pos)
    return trunk.norm_pre(trunk.patch_drop(x))


def image_features(visual: ImageTower, resampler: PatchEmbedResamplerFixedOrigSize, images: Tensor,
                   patch_size: int | None = None) -> Tensor:
    """images [B, 3, H, W] -> features [B, output_dim] (not normalised) at patch_size (default: the base)."""
    patch_size = patch_size or base_patch_size(visual)
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        tokens = embed_patches_timm(visual, resampler, images, patch_size)
        if trunk.grad_checkpointing and not torch.jit.is_scripting():
            tokens = checkpoint_seq(trunk.blocks, tokens)
        else:
            tokens = trunk.blocks(tokens)
        # timm's norm, pooling (class token / mean / MAP head), fc_norm, head; then open_clip's adapter head
        return visual.head(trunk.forward_head(trunk.norm(tokens)))
    tokens = embed_patches(visual, resampler, images, patch_size)
    pooled, _ = visual._pool(visual.transformer(tokens))  # open_clip's own pooling (tok / avg, ln_post)
    return pooled @ visual.proj if visual.proj is not None else pooled
