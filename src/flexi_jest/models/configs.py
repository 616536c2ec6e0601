"""ModelConfig <-> open_clip model configs (the dicts of open_clip's model_configs/*.json).

Named models use open_clip's own config; the project's configs (no name) are built from the sizes:
open_clip's VisionTransformer with average pooling over the patch tokens, open_clip's TextTransformer
(custom_text), and SigLIP's logit scale t' = log 10 and bias -10 at init. The project's presets are
registered with open_clip as `flexi-jest-<preset>` (open_clip.add_model_config on open_clip_configs/), so
`open_clip.create_model("flexi-jest-tiny")` builds the same architecture outside this project.
"""

import copy
from pathlib import Path
from typing import Any

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from flexi_jest.config import PRESET_OPEN_CLIP_PREFIX, ModelConfig
from flexi_jest.losses import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT

OPEN_CLIP_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
PRESET_PREFIX = PRESET_OPEN_CLIP_PREFIX
open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)

# What flexi-jest's image tower, tokenizer and FLOP accounting cover: open_clip's own ViT and text transformer.
_UNSUPPORTED_VISION = ("timm_model_name", "eva_model_name", "attentional_pool")
_UNSUPPORTED_TEXT = ("hf_model_name", "hf_tokenizer_name")


def project_open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip model config of a project (unnamed) ModelConfig."""
    return {
        "embed_dim": cfg.embed_dim,
        "custom_text": True,
        "init_logit_scale": LOGIT_SCALE_INIT,
        "init_logit_bias": LOGIT_BIAS_INIT,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                       "layers": cfg.vision_depth, "head_width": cfg.vision_width // cfg.vision_heads,
                       "mlp_ratio": 4.0, "pool_type": "avg"},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_depth},
    }


def open_clip_config(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg, ...) that builds cfg's model."""
    if cfg.name is None:
        return project_open_clip_config(cfg)
    return _named_config(cfg.name)


def preprocess_config(cfg: ModelConfig) -> dict[str, Any]:
    """open_clip's preprocess config (open_clip_config.json's `preprocess_cfg`) of cfg's image input."""
    return {"size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def _named_config(name: str) -> dict[str, Any]:
    found = open_clip.get_model_config(name)
    if found is None:
        close = [m for m in open_clip.list_models() if name.lower()[:5] in m.lower()][:8]
        raise ValueError(f"model {name!r} is neither a preset (tiny, small, vit_b16) nor an open_clip model "
                         f"(open_clip.list_models()); similar: {close}")
    found = copy.deepcopy(found)
    vision, text = found.get("vision_cfg", {}), found.get("text_cfg", {})
    problems = [f"vision_cfg.{k}={vision[k]!r}" for k in _UNSUPPORTED_VISION if vision.get(k)]
    problems += [f"text_cfg.{k}={text[k]!r}" for k in _UNSUPPORTED_TEXT if text.get(k)]
    if "multimodal_cfg" in found:
        problems.append("multimodal_cfg (CoCa)")
    if not isinstance(vision.get("layers"), int) or not isinstance(vision.get("patch_size", 16), int):
        problems.append(f"vision_cfg.layers={vision.get('layers')!r} (a ResNet tower)")
    if not isinstance(vision.get("image_size", 224), int):
        problems.append(f"vision_cfg.image_size={vision.get('image_size')!r} (not square)")
    if vision.get("pos_embed_type", "learnable") != "learnable":
        problems.append(f"vision_cfg.pos_embed_type={vision['pos_embed_type']!r}")
    if float(vision.get("mlp_ratio", 4.0)) != 4.0 or float(text.get("mlp_ratio", 4.0)) != 4.0:
        problems.append("mlp_ratio != 4")
    if problems:
        raise ValueError(f"open_clip model {name!r} is not supported: flexi-jest's flexible-patch image tower, "
                         f"tokenizer and FLOP accounting cover open_clip's own ViT and text transformer "
                         f"(e.g. ViT-B-32, ViT-B-16, ViT-S-16, ViT-M-16); {name} has {', '.join(problems)}")
    if found.get("init_logit_bias") is None:  # a CLIP config: the sigmoid loss needs a bias, SigLIP's init
        found["init_logit_bias"] = LOGIT_BIAS_INIT
        found["init_logit_scale"] = LOGIT_SCALE_INIT
    return found


def fields_from_open_clip(name: str) -> dict[str, Any]:
    """ModelConfig's fields for open_clip model `name` (its sizes, and its preprocessing's mean and std)."""
    found = _named_config(name)
    vision, text = found["vision_cfg"], found["text_cfg"]
    width = vision["width"]
    preprocess = found.get("preprocess_cfg", {})
    return {
        "name": name,
        "image_size": vision.get("image_size", 224),
        "patch_size": vision.get("patch_size", 16),
        "vision_width": width,
        "vision_depth": vision["layers"],
        "vision_heads": width // vision.get("head_width", 64),
        "text_width": text.get("width", 512),
        "text_depth": text.get("layers", 12),
        "text_heads": text.get("heads", 8),
        "context_length": text.get("context_length", 77),
        "vocab_size": text.get("vocab_size", 49408),
        "embed_dim": found["embed_dim"],
        "mean": tuple(preprocess.get("mean", OPENAI_DATASET_MEAN)),
        "std": tuple(preprocess.get("std", OPENAI_DATASET_STD)),
    }
