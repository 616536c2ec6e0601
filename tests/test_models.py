"""Architectures by name: presets and open_clip model names, the presets registered with open_clip."""

import open_clip
import pytest
import torch

from flexi_jest.config import MODEL_PRESETS, PRESET_OPEN_CLIP_PREFIX, ConfigError, ModelConfig, validated_stage_config
from flexi_jest.models import DualEncoder, Tokenizer, TokenizerUnavailable
from flexi_jest.models.configs import project_open_clip_config


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
    assert cfg.mean == pytest.approx(
        open_clip.OPENAI_DATASET_MEAN) and cfg.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg  # a model file's config reads back


def test_fields_that_contradict_the_named_model_are_refused():
    with pytest.raises(ConfigError, match="vision_width=100 conflicts with open_clip's ViT-S-16 config"):
        validated_stage_config("train-reference", "tiny", {"model": {"name": "ViT-S-16", "vision_width": 100}})


def test_unknown_and_unsupported_models_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="neither a preset"):
        validated_stage_config("train-reference", "tiny", {"model": "ViT-X-99"})
    # a Hugging Face text tower is transformers' architecture, outside the text tower flexi-jest accounts for
    with pytest.raises(ConfigError, match=r"text_cfg.hf_model_name='roberta-base' \(a Hugging Face text model"):
        validated_stage_config("train-reference", "tiny", {"model": "roberta-ViT-B-32"})
    with pytest.raises(ConfigError, match="ResNet"):
        validated_stage_config("train-reference", "tiny", {"model": "RN50"})


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_are_registered_with_open_clip(preset):
    ours = project_open_clip_config(MODEL_PRESETS[preset])
    assert open_clip.get_model_config(f"{PRESET_OPEN_CLIP_PREFIX}{preset}") == ours


def test_open_clip_builds_the_same_model_from_the_registered_preset():
    torch.manual_seed(0)
    ours = DualEncoder(MODEL_PRESETS["tiny"]).eval()
    theirs = open_clip.create_model(f"{PRESET_OPEN_CLIP_PREFIX}tiny").eval()
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
            cfg.vision_prefix_tokens, cfg.vision_map_pool,
            cfg.vision_projection) == (32, 8, 48, 2, 3, 48, 0, True, False)
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


def test_the_paper_model_vit_b16_siglip_is_accepted_by_name():
    """ViT-B-16-SigLIP: timm's MAP-pooled ViT-B/16 and open_clip's text transformer with SigLIP's options; its
    Hugging Face tokenizer is loaded when a stage starts (Tokenizer), not when the config is read."""
    cfg = validated_stage_config("train-reference", "tiny", {"model": "ViT-B-16-SigLIP"}).model
    assert (cfg.name, cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_depth, cfg.vision_prefix_tokens,
            cfg.vision_map_pool, cfg.vision_projection, cfg.embed_dim, cfg.context_length, cfg.vocab_size) == \
        ("ViT-B-16-SigLIP", 224, 16, 768, 12, 0, True, False, 768, 64, 32000)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from timm_towers import register_hf_tokenizer_clip
    return register_hf_tokenizer_clip(tmp_path_factory.mktemp("hf_tokenizer_clip"))


def test_the_tokenizer_follows_the_model(hf_clip):
    """Tokenizer(cfg) gives open_clip's tokens for the model: its Hugging Face tokenizer (read from a local
    directory) for a config that names one, open_clip's BPE tokenizer for the others."""
    texts = ["a small red circle on the left", "A picture of a large striped blue star above a small green cross.",
             "an unknown word"]
    tokens = Tokenizer(ModelConfig(name=hf_clip))(texts)
    expected = open_clip.get_tokenizer(hf_clip)(texts)
    assert type(open_clip.get_tokenizer(hf_clip)).__name__ == "HFTokenizer"
    assert tokens.dtype == torch.long and tokens.shape == (3, 16) and torch.equal(tokens, expected)
    assert tokens[0, 7].item() == 1 and tokens[0, 8:].eq(0).all()  # 7 words, then </s>, then <pad>
    for cfg in (ModelConfig(name="ViT-B-32"), MODEL_PRESETS["tiny"]):  # open_clip's BPE tokenizer
        name = cfg.name or f"{PRESET_OPEN_CLIP_PREFIX}tiny"
        expected = open_clip.get_tokenizer(name, context_length=cfg.context_length)(texts)
        assert torch.equal(Tokenizer(cfg)(texts), expected)
    # "siglip" in a name without hf_tokenizer_name: the config decides (open_clip's BPE), not open_clip's name guess
    bpe = open_clip.tokenizer.SimpleTokenizer(context_length=16)(texts)
    assert torch.equal(Tokenizer(ModelConfig(name="test-tiny-siglip-timm"))(texts), bpe)


def test_text_embeddings_equal_open_clips_with_a_hugging_face_tokenizer(hf_clip):
    torch.manual_seed(0)
    theirs = open_clip.create_model(hf_clip).eval()
    ours = DualEncoder(ModelConfig(name=hf_clip)).eval()
    ours.clip.load_state_dict(theirs.state_dict())
    texts = ["a small red circle on the left", "a large dotted purple diamond below a small white square"]
    with torch.no_grad():
        expected = theirs.encode_text(open_clip.get_tokenizer(hf_clip)(texts), normalize=True)
        got = ours.encode_text(Tokenizer(ours.cfg)(texts))
    print(f"{hf_clip} text embeddings, max abs diff: {(got - expected).abs().max().item():.3g}")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_hugging_face_tokenizer_missing_offline_fails_at_once_with_how_to_get_it(tmp_path, monkeypatch):
    """The real ViT-B-16-SigLIP, its tokenizer not in the local Hugging Face cache: the stage fails before it
    builds the model, naming the tokenizer and how to make it available (no transformers traceback)."""
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache("timm/ViT-B-16-SigLIP", "tokenizer_config.json"), str):
        pytest.skip("this machine's Hugging Face cache holds timm/ViT-B-16-SigLIP's tokenizer: not missing here")
    from flexi_jest.config import TrainReferenceConfig
    from flexi_jest.train import train_reference
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(DualEncoder, "__init__", lambda *args: pytest.fail("the model was built first"))
    cfg = TrainReferenceConfig(model="ViT-B-16-SigLIP", data=str(tmp_path / "data"), out_dir=str(tmp_path / "out"),
                               steps=1, device="cpu")
    with pytest.raises(TokenizerUnavailable) as failed:
        train_reference(cfg)
    message = str(failed.value)
    print(message)
    for part in ("model ViT-B-16-SigLIP", "'timm/ViT-B-16-SigLIP'", "local Hugging Face cache", "HF_HUB_OFFLINE=1",
                 "local directory", "hf download timm/ViT-B-16-SigLIP"):
        assert part in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # no chained transformers error
