"""FlexiViT image tower: one set of weights, the patch size chosen per forward call.

The patch-embedding kernel is stored at a base patch size and resampled to the requested size by
pseudo-inverse resize (PI-resize, FlexiViT): for an upsampling resize R, the resampled kernel w'
satisfies <R x, w'> = <x, w> for every patch x, so a patch resized with the image keeps its token.
The position embeddings are stored on the base grid and resized to the token grid of each call.
Transformer blocks are timm's.
"""

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class FlexiViT(nn.Module):
    """ViT with patch size as a forward argument.

    image_size:      side of the (square) input images, px
    base_patch_size: the stored kernel's size; any patch size dividing image_size works at call time
    width, depth, heads, mlp_ratio: transformer sizes
    output_dim:      size of the pooled, projected output (global average pooling over tokens)
    """

    def __init__(
        self,
        image_size: int,
        base_patch_size: int,
        width: int,
        depth: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ):
        super().__init__()
        if image_size % base_patch_size:
            raise ValueError(f"base_patch_size {base_patch_size} must divide image_size {image_size}")
        self.image_size = image_size
        self.base_patch_size = base_patch_size
        self.base_grid = image_size // base_patch_size
        self.patch_weight = nn.Parameter(torch.empty(width, in_chans, base_patch_size, base_patch_size))
        self.patch_bias = nn.Parameter(torch.zeros(width))
        self.pos_embed = nn.Parameter(torch.empty(1, self.base_grid**2, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, output_dim)
        self.kernel_resampler = PatchEmbedResamplerFixedOrigSize((base_patch_size, base_patch_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.patch_weight.view(self.patch_weight.shape[0], -1), mode="fan_in", nonlinearity="linear")
        trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def patch_kernel(self, patch_size: int) -> Tensor:
        """The kernel [width, C, p, p] for patch size p (PI-resize of the base kernel; the matrix is cached per size)."""
        return self.kernel_resampler(self.patch_weight, [patch_size, patch_size])

    def embed_patches(self, images: Tensor, patch_size: int) -> Tensor:
        """images [B, C, H, W] -> patch tokens [B, (H/p)*(W/p), width], position embeddings added."""
        height, width = images.shape[-2:]
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image size {height}x{width}")
        tokens = F.conv2d(images, self.patch_kernel(patch_size), self.patch_bias, stride=patch_size)
        grid = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, list(grid), old_size=[self.base_grid, self.base_grid], num_prefix_tokens=0
        )
        return tokens + pos_embed

    def forward(self, images: Tensor, patch_size: int | None = None) -> Tensor:
        """images [B, C, H, W] -> features [B, output_dim] (not normalised)."""
        tokens = self.embed_patches(images, patch_size or self.base_patch_size)
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.mean(dim=1))
