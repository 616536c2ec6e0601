"""Tiny open_clip models whose image tower is open_clip's TimmModel around a timm VisionTransformer trunk,
registered with timm and open_clip as any model is, so the timm path is tested without a 100M-parameter ViT.

    flexi_jest_test_vit_map   SigLIP's ViT-B-16 tower shape (no class token, MAP pooling, timm_proj "none"),
                              32 px, patch 8, width 48, 2 blocks, 3 heads
    flexi_jest_test_vit_reg   a class token and 2 register tokens without position embeddings
                              (no_embed_class), class-token pooling, timm_proj "linear" to embed_dim 32
"""

import json

import open_clip
import timm
from timm.models import register_model

TINY_TRUNK = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


@register_model
def flexi_jest_test_vit_map(pretrained: bool = False, **kwargs):
    return timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **{**TINY_TRUNK, **kwargs})


@register_model
def flexi_jest_test_vit_reg(pretrained: bool = False, **kwargs):
    args = dict(TINY_TRUNK, class_token=True, reg_tokens=2, no_embed_class=True, global_pool="token")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs})


# SigLIP's text tower options (no causal mask, last-token pooling, projection bias), tiny, with open_clip's
# own BPE tokenizer (SigLIP's is a Hugging Face tokenizer, fetched from the hub).
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
             "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
TIMM_CLIP_CONFIGS = {
    "test-tiny-siglip-timm": {
        "embed_dim": 48, "init_logit_bias": -10, "custom_text": True, "text_cfg": TINY_TEXT,
        "vision_cfg": {"image_size": 32, "timm_model_name": "flexi_jest_test_vit_map",
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"}},
    "test-tiny-timm-registers": {
        "embed_dim": 32, "init_logit_bias": -10, "custom_text": True, "text_cfg": TINY_TEXT,
        "vision_cfg": {"image_size": 32, "timm_model_name": "flexi_jest_test_vit_reg",
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": "linear"}},
}


def register_timm_clip_configs(directory, extra: dict | None = None) -> list[str]:
    """Write TIMM_CLIP_CONFIGS (and extra {name: config}) as open_clip model configs under directory and
    register them with open_clip; returns their names."""
    configs = {**TIMM_CLIP_CONFIGS, **(extra or {})}
    for name, config in configs.items():
        (directory / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory)
    return list(configs)
