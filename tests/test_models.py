"""Architectures by name: presets and open_clip model names, the presets registered with open_clip."""

import open_clip
import pytest
import torch

from flexi_jest.config import MODEL_PRESETS, ConfigError, ModelConfig, validated_stage_config
from flexi_jest.models import DualEncoder
from flexi_jest.models.configs import PRESET_PREFIX, project_open_clip_config


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_a_preset_by_name(preset):
    assert ModelConfig.model_validate(preset) == MODEL_PRESETS[preset]
    cfg = validated_stage_config("train-reference", "tiny", {"model": preset})
    assert cfg.model == MODEL_PRESETS[preset]


def test_a_preset_by_name_with_overrides():
    cfg = validated_stage_config("train-reference", "tiny", {"model": {"name": "small", "vision_depth": 2}})
    assert cfg.model == MODEL_PRESETS["small"].model_copy(update={"vision_depth": 2})


def test_an_open_clip_model_by_name():
    cfg = validated_stage_config("train-learner", "tiny", {"model": "ViT-S-16", "train_patch_sizes": [16, 32],
                                                           "method": "uniform"}).model
    assert (cfg.name, cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_heads, cfg.embed_dim,
            cfg.context_length) == ("ViT-S-16", 224, 16, 384, 6, 384, 77)
    assert cfg.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN) and cfg.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg  # a model file's config reads back


def test_fields_that_contradict_the_named_model_are_refused():
    with pytest.raises(ConfigError, match="vision_width=100 conflicts with open_clip's ViT-S-16 config"):
        validated_stage_config("train-reference", "tiny", {"model": {"name": "ViT-S-16", "vision_width": 100}})


def test_unknown_and_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="neither a preset"):
        validated_stage_config("train-reference", "tiny", {"model": "ViT-X-99"})
    # SigLIP's image tower is supported (a timm VisionTransformer); its text side needs a Hugging Face tokenizer
    with pytest.raises(ConfigError, match=r"hf_tokenizer_name='timm/ViT-B-16-SigLIP' \(a Hugging Face tokenizer.*"
                                          r"available offline\)") as refused:
        validated_stage_config("train-reference", "tiny", {"model": "ViT-B-16-SigLIP"})
    assert "timm_model_name" not in str(refused.value)
    with pytest.raises(ConfigError, match="ResNet"):
        validated_stage_config("train-reference", "tiny", {"model": "RN50"})


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_are_registered_with_open_clip(preset):
    assert open_clip.get_model_config(f"{PRESET_PREFIX}{preset}") == project_open_clip_config(MODEL_PRESETS[preset])


def test_open_clip_builds_the_same_model_from_the_registered_preset():
    torch.manual_seed(0)
    ours = DualEncoder(MODEL_PRESETS["tiny"]).eval()
    theirs = open_clip.create_model(f"{PRESET_PREFIX}tiny").eval()
    theirs.load_state_dict(ours.clip.state_dict())
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), theirs.encode_image(images, normalize=True))
        assert torch.equal(ours.encode_text(tokens), theirs.encode_text(tokens, normalize=True))


def test_a_named_open_clip_vit_runs_at_its_base_patch_and_flexibly():
    torch.manual_seed(0)
    model = DualEncoder(ModelConfig(name="ViT-S-16")).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        base = model.encode_image(images)
        assert torch.equal(model.image_features(images), model.clip.visual(images))
        assert model.encode_image(images, 32).shape == base.shape == (1, 384)


@pytest.fixture(scope="module")
def timm_clips(tmp_path_factory):
    """The tiny timm-tower configs (timm_towers.py) and three that are refused."""
    from timm_towers import TIMM_CLIP_CONFIGS, register_timm_clip_configs
    siglip = TIMM_CLIP_CONFIGS["test-tiny-siglip-timm"]
    refused = {
        "test-timm-resnet": {**siglip, "vision_cfg": {**siglip["vision_cfg"], "timm_model_name": "resnet18",
                                                        "timm_pool": "avg"}},
        "test-timm-wrong-size": {**siglip, "vision_cfg": {**siglip["vision_cfg"], "image_size": 64}},
        "test-timm-mlp-proj": {**siglip, "vision_cfg": {**siglip["vision_cfg"], "timm_proj": "mlp"}},
    }
    return register_timm_clip_configs(tmp_path_factory.mktemp("timm_clip_configs"), refused)


def test_a_timm_towers_sizes_are_read_from_timm(timm_clips):
    cfg = ModelConfig(name="test-tiny-siglip-timm")
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_depth, cfg.vision_heads, cfg.embed_dim,
            cfg.vision_prefix_tokens, cfg.vision_map_pool, cfg.vision_projection) == (32, 8, 48, 2, 3, 48, 0, True, False)
    registers = ModelConfig(name="test-tiny-timm-registers")
    assert (registers.vision_prefix_tokens, registers.vision_map_pool, registers.vision_projection) == (3, False, True)
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg  # a model file's config reads back
    with pytest.raises(ConfigError, match="vision_map_pool=False conflicts"):
        validated_stage_config("train-reference", "tiny", {"model": {"name": "test-tiny-siglip-timm",
                                                                     "vision_map_pool": False}})


def test_timm_towers_outside_the_flexible_forward_are_refused_with_the_reason(timm_clips):
    with pytest.raises(ConfigError, match="'resnet18' with a timm ResNet trunk, not a timm VisionTransformer"):
        validated_stage_config("train-reference", "tiny", {"model": "test-timm-resnet"})
    with pytest.raises(ConfigError, match=r"image_size=64 but the timm trunk's img_size is \(32, 32\)"):
        validated_stage_config("train-reference", "tiny", {"model": "test-timm-wrong-size"})
    with pytest.raises(ConfigError, match=r"an image head of \['Mlp'\]"):
        validated_stage_config("train-reference", "tiny", {"model": "test-timm-mlp-proj"})


def test_the_tower_shape_fields_belong_to_named_models():
    with pytest.raises(ConfigError, match="describe a named open_clip model's image tower"):
        validated_stage_config("train-reference", "tiny", {"model": {"name": "tiny", "vision_map_pool": True}})
