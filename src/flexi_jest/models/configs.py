"""ModelConfig -> open_clip model configs (the dicts of open_clip's model_configs/*.json).

Named models use open_clip's own config (open_clip_names.py says which are supported and why not). The
project's configs (no name) are built from the sizes:
open_clip's VisionTransformer with average pooling over the patch tokens, open_clip's TextTransformer
(custom_text), and SigLIP's logit scale t' = log 10 and bias -10 at init. The project's presets are
registered with open_clip as `flexi-jest-<preset>` (open_clip.add_model_config on open_clip_configs/), so
`open_clip.create_model("flexi-jest-tiny")` builds the same architecture outside this project.
"""

from pathlib import Path
from typing import Any

import open_clip

from flexi_jest.config import ModelConfig
from flexi_jest.losses import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT
from flexi_jest.models.open_clip_names import named_config

OPEN_CLIP_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)


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
    return named_config(cfg.name)


def preprocess_config(cfg: ModelConfig) -> dict[str, Any]:
    """open_clip's preprocess config (open_clip_config.json's `preprocess_cfg`) of cfg's image input."""
    return {"size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": "bicubic",
            "resize_mode": "shortest"}
