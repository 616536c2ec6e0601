"""What open_clip says about a model name: its config, whether flexi-jest's tower and FLOP accounting cover it,
and the ModelConfig fields it implies.

Named models use open_clip's own config (open_clip.get_model_config). Their image tower is open_clip's
VisionTransformer, or open_clip's TimmModel around a timm VisionTransformer trunk (SigLIP's ViT-B-16-SigLIP: no
class token, MAP pooling, no projection), whose sizes are read from the trunk timm builds (on the meta device: no
weights, no download); other towers are refused with the reason. This module imports nothing of flexi_jest but
the loss's constants, so config.ModelConfig can resolve a name through it and models/configs.py can build from
it without an import cycle.
"""

import copy
import functools
import json
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import _build_vision_tower
from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from flexi_jest.losses import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT

# What flexi-jest's image tower and FLOP accounting cover: open_clip's own ViT or a timm VisionTransformer trunk
# (checked in timm_tower_fields), and open_clip's own text transformer. Its tokenizer is open_clip's for the name
# (tokenizer.py): the BPE one, or a Hugging Face tokenizer (hf_tokenizer_name) read from local files.
_UNSUPPORTED_VISION = ("eva_model_name", "attentional_pool")
_UNSUPPORTED_TEXT = ("hf_model_name",)
_TEXT_REASONS = {
    "hf_model_name": "a Hugging Face text model (transformers' architecture, not open_clip's text transformer, "
                     "which flexi-jest's FLOP accounting covers)",
}


def named_config(name: str) -> dict[str, Any]:
    """open_clip's model config of `name` (a copy), made ready for flexi-jest (timm downloads nothing, a CLIP
    config gets SigLIP's logit bias init), or ValueError (one line) saying why flexi-jest cannot build it."""
    found = open_clip.get_model_config(name)
    if found is None:
        close = [m for m in open_clip.list_models() if name.lower()[:5] in m.lower()][:8]
        raise ValueError(f"model {name!r} is neither a preset (tiny, small, vit_b16) nor an open_clip model "
                         f"(open_clip.list_models()); similar: {close}")
    found = copy.deepcopy(found)
    vision, text = found.get("vision_cfg", {}), found.get("text_cfg", {})
    problems = [f"vision_cfg.{k}={vision[k]!r}" for k in _UNSUPPORTED_VISION if vision.get(k)]
    problems += [f"text_cfg.{k}={text[k]!r}" + (f" ({_TEXT_REASONS[k]})" if k in _TEXT_REASONS else "")
                 for k in _UNSUPPORTED_TEXT if text.get(k)]
    if "multimodal_cfg" in found:
        problems.append("multimodal_cfg (CoCa)")
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False  # weights come from a checkpoint: timm downloads nothing
        problems += timm_tower_problems(vision, found["embed_dim"])
    else:
        if not isinstance(vision.get("layers"), int) or not isinstance(vision.get("patch_size", 16), int):
            problems.append(f"vision_cfg.layers={vision.get('layers')!r} (a ResNet tower)")
        if not isinstance(vision.get("image_size", 224), int):
            problems.append(f"vision_cfg.image_size={vision.get('image_size')!r} (not square)")
        if vision.get("pos_embed_type", "learnable") != "learnable":
            problems.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r}")
        if float(vision.get("mlp_ratio", 4.0)) != 4.0:
            problems.append("vision mlp_ratio != 4")
    if float(text.get("mlp_ratio", 4.0)) != 4.0:
        problems.append("text mlp_ratio != 4")
    if problems:
        raise ValueError(f"open_clip model {name!r} is not supported: flexi-jest's flexible-patch image tower "
                         f"and FLOP accounting cover open_clip's own ViT or a timm VisionTransformer trunk, and "
                         f"open_clip's text transformer (e.g. ViT-B-32, ViT-B-16, ViT-S-16, ViT-M-16, "
                         f"ViT-B-16-SigLIP); {name} has {'; '.join(problems)}")
    if found.get("init_logit_bias") is None:  # a CLIP config: the sigmoid loss needs a bias, SigLIP's init
        found["init_logit_bias"] = LOGIT_BIAS_INIT
        found["init_logit_scale"] = LOGIT_SCALE_INIT
    return found


def fields_from_open_clip(name: str) -> dict[str, Any]:
    """ModelConfig's fields for open_clip model `name` (its sizes, and its preprocessing's mean and std)."""
    found = named_config(name)
    vision, text = found["vision_cfg"], found["text_cfg"]
    preprocess = found.get("preprocess_cfg", {})
    if vision.get("timm_model_name"):
        vision_fields = timm_tower_fields(vision, found["embed_dim"])
    else:
        width = vision["width"]
        vision_fields = {"image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
                         "vision_width": width, "vision_depth": vision["layers"],
                         "vision_heads": width // vision.get("head_width", 64), "vision_prefix_tokens": 1,
                         "vision_map_pool": False, "vision_projection": True}
    return {
        "name": name,
        **vision_fields,
        "text_width": text.get("width", 512),
        "text_depth": text.get("layers", 12),
        "text_heads": text.get("heads", 8),
        "context_length": text.get("context_length", 77),
        "vocab_size": text.get("vocab_size", 49408),
        "embed_dim": found["embed_dim"],
        "mean": tuple(preprocess.get("mean", OPENAI_DATASET_MEAN)),
        "std": tuple(preprocess.get("std", OPENAI_DATASET_STD)),
    }


@functools.lru_cache(maxsize=32)
def _meta_timm_tower(vision_json: str, embed_dim: int) -> nn.Module:
    """open_clip's TimmModel for a vision_cfg, built on the meta device (shapes only: no weights, no download)."""
    vision = {**json.loads(vision_json), "timm_model_pretrained": False}
    with torch.device("meta"):
        return _build_vision_tower(embed_dim, vision)


def meta_timm_tower(vision: dict[str, Any], embed_dim: int) -> nn.Module:
    return _meta_timm_tower(json.dumps(vision, sort_keys=True), embed_dim)


def timm_trunk_problems(visual: nn.Module, image_size: Any, embed_dim: int) -> list[str]:
    """Why an open_clip TimmModel is outside flexivit.py's forward and flops.py's accounting ([] when inside):
    the trunk must be a timm VisionTransformer (timm's PatchEmbed, standard blocks with MLP ratio 4, token /
    mean / MAP pooling) and the adapter head at most one linear map to embed_dim."""
    trunk = visual.trunk
    if type(trunk) is not VisionTransformer:
        return [f"a timm {type(trunk).__name__} trunk, not a timm VisionTransformer"]
    problems = []
    embed, width = trunk.patch_embed, trunk.embed_dim
    if type(embed) is not PatchEmbed or embed.patch_size[0] != embed.patch_size[1] or \
            tuple(embed.proj.stride) != tuple(embed.patch_size) or tuple(embed.proj.padding) != (0, 0):
        problems.append(f"patch embedding {type(embed).__name__} (a square, non-overlapping PatchEmbed is needed)")
    if image_size not in (embed.img_size[0], list(embed.img_size), tuple(embed.img_size)) or \
            embed.img_size[0] != embed.img_size[1]:
        problems.append(f"vision_cfg.image_size={image_size!r} but the timm trunk's img_size is {embed.img_size} "
                        f"(open_clip does not pass image_size to timm)")
    for block in trunk.blocks:
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            problems.append(f"blocks of {type(block).__module__}.{type(block).__name__} with "
                            f"{type(block.attn).__name__} and {type(block.mlp).__name__} (timm's vision_transformer "
                            f"Block with Attention and Mlp is needed)")
            break
        if block.mlp.fc1.out_features != 4 * width:
            problems.append(f"vision mlp_ratio {block.mlp.fc1.out_features / width:g} != 4")
            break
    pool = trunk.attn_pool
    if pool is not None:
        if type(pool) is not AttentionPoolLatent or pool.latent_len != 1 or pool.pos_embed is not None or \
                pool.mlp is None or not isinstance(pool.q, nn.Linear):
            problems.append(f"attention pool {type(pool).__name__} (a MAP head with one latent query is needed)")
        elif pool.mlp.fc1.out_features != 4 * width:
            problems.append(f"a MAP head of MLP ratio {pool.mlp.fc1.out_features / width:g} != 4")
        elif trunk.pool_include_prefix and trunk.num_prefix_tokens:
            problems.append("a MAP head that attends over the prefix tokens too (pool_include_prefix)")
    elif trunk.global_pool not in ("token", "avg", "avgmax", "max"):
        problems.append(f"timm global_pool {trunk.global_pool!r} (no pooled feature)")
    linears = [m for m in (trunk.head, *visual.head) if isinstance(m, nn.Linear)]
    others = [type(m).__name__ for m in visual.head if not isinstance(m, (nn.Linear, nn.Dropout))]
    if others or len(linears) > 1:
        problems.append(f"an image head of {others or 'two linear maps'} (timm_pool / timm_proj: at most one linear "
                        f"projection after timm's pooling is supported)")
    elif (linears[0].out_features if linears else width) != embed_dim:
        problems.append(
            f"image features of width {width} but embed_dim {embed_dim} (timm_proj 'none' needs them equal)")
    return problems


def timm_tower_problems(vision: dict[str, Any], embed_dim: int) -> list[str]:
    """timm_trunk_problems of the tower vision_cfg builds, or why it cannot be built."""
    try:
        visual = meta_timm_tower(vision, embed_dim)
    except Exception as exc:  # an unknown timm name, arguments timm refuses
        return [f"vision_cfg.timm_model_name={vision['timm_model_name']!r}, which timm cannot build: {exc}"]
    return [f"vision_cfg.timm_model_name={vision['timm_model_name']!r} with " + p
            for p in timm_trunk_problems(visual, vision.get("image_size", 224), embed_dim)]


def timm_tower_fields(vision: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    """ModelConfig's image-tower fields read from the timm VisionTransformer trunk of a supported vision_cfg."""
    visual = meta_timm_tower(vision, embed_dim)
    trunk = visual.trunk
    return {"image_size": trunk.patch_embed.img_size[0], "patch_size": trunk.patch_embed.patch_size[0],
            "vision_width": trunk.embed_dim, "vision_depth": len(trunk.blocks),
            "vision_heads": trunk.blocks[0].attn.num_heads, "vision_prefix_tokens": trunk.num_prefix_tokens,
            "vision_map_pool": trunk.attn_pool is not None,
            "vision_projection": any(isinstance(m, nn.Linear) for m in (trunk.head, *visual.head))}
