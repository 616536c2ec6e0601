"""Architectures by name: open_clip CLIP models with a flexible-patch (FlexiViT) image tower.

configs.py      ModelConfig <-> open_clip model configs; the presets registered with open_clip
flexivit.py     the patch size as a forward argument of open_clip's VisionTransformer or TimmModel (timm ViT trunk)
dual_encoder.py DualEncoder (wraps the open_clip model), Tokenizer
pretrained.py   open_clip checkpoints (files, s3://, cached pretrained tags) into a DualEncoder
"""

from flexi_jest.models.dual_encoder import DualEncoder, Tokenizer, build_open_clip, parameter_count

__all__ = ["DualEncoder", "Tokenizer", "build_open_clip", "parameter_count"]
