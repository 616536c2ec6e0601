"""Architectures by name: open_clip CLIP models with a flexible-patch (FlexiViT) image tower.

configs.py      ModelConfig -> open_clip model configs; the presets registered with open_clip
open_clip_names.py  what open_clip says about a model name: its config, whether it is supported, its fields
flexivit.py     the patch size as a forward argument of open_clip's VisionTransformer or TimmModel (timm ViT trunk)
dual_encoder.py DualEncoder (wraps the open_clip model)
tokenizer.py    Tokenizer: the model's open_clip tokenizer (BPE, or a Hugging Face tokenizer from local files)
pretrained.py   open_clip checkpoints (files, s3://, cached pretrained tags) into a DualEncoder
"""

from flexi_jest.models.dual_encoder import DualEncoder, build_open_clip, parameter_count
from flexi_jest.models.tokenizer import Tokenizer, TokenizerUnavailable

__all__ = ["DualEncoder", "Tokenizer", "TokenizerUnavailable", "build_open_clip", "parameter_count"]
