"""Tiny open_clip models whose image tower is open_clip's TimmModel around a timm VisionTransformer trunk,
registered with timm and open_clip as any model is, so the timm path is tested without a 100M-parameter ViT.

    flexi_jest_test_vit_map   SigLIP's ViT-B-16 tower shape (no class token, MAP pooling, timm_proj "none"),
                              32 px, patch 8, width 48, 2 blocks, 3 heads
    flexi_jest_test_vit_reg   a class token and 2 register tokens without position embeddings
                              (no_embed_class), class-token pooling, timm_proj "linear" to embed_dim 32

register_hf_tokenizer_clip adds ViT-B-16-SigLIP's whole shape, tiny: the MAP tower, SigLIP's text tower and a
Hugging Face tokenizer (built here with the `tokenizers` library, saved to a local directory: no download).
"""

import copy
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
# own BPE tokenizer (SigLIP's is a Hugging Face tokenizer: register_hf_tokenizer_clip below).
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


def shapes_words() -> list[str]:
    """Every word of the shapes dataset's captions and zero-shot prompts (flexi_jest.data.shapes), sorted."""
    from flexi_jest.data import shapes
    phrases = [*shapes.SHAPES, *shapes.COLOURS, *shapes.SIZES, *shapes.TEXTURES, *shapes.POSITIONS,
               *shapes.RELATIONS, *shapes.CAPTION_TEMPLATES, *shapes.TEMPLATES, "a"]
    return sorted({word for phrase in phrases for word in phrase.replace("{}", " ").replace(".", " ").split()})


def save_hf_tokenizer(directory) -> int:
    """A tiny Hugging Face tokenizer (the `tokenizers` library's WordLevel model over shapes_words(), lower-cased,
    split on whitespace and punctuation, an end token appended as SigLIP's T5 tokenizer does; <pad> = 0), wrapped as
    transformers' PreTrainedTokenizerFast and saved with save_pretrained under directory; returns its vocab size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *shapes_words()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))
    return len(vocab)


HF_TOKENIZER_CLIP = "test-tiny-siglip-hf-tokenizer"


def register_hf_tokenizer_clip(directory) -> str:
    """A tiny open_clip config of ViT-B-16-SigLIP's shape whose text_cfg names a Hugging Face tokenizer
    (save_hf_tokenizer, in directory/tokenizer) as ViT-B-16-SigLIP's names `timm/ViT-B-16-SigLIP`: the timm MAP
    tower above and SigLIP's text tower options (no causal mask, last-token pooling, projection bias, the
    tokenizer's vocab size, canonicalize cleaning); registered with open_clip, returns its name."""
    vocab_size = save_hf_tokenizer(directory / "tokenizer")
    config = copy.deepcopy(TIMM_CLIP_CONFIGS["test-tiny-siglip-timm"])
    config["text_cfg"].update(vocab_size=vocab_size, hf_tokenizer_name=str(directory / "tokenizer"),
                              tokenizer_kwargs={"clean": "canonicalize"})
    register_timm_clip_configs(directory, {HF_TOKENIZER_CLIP: config})
    return HF_TOKENIZER_CLIP
