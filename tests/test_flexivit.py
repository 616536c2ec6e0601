import pytest
import torch
import torch.nn.functional as F

from flexi_jest.config import MODEL_PRESETS, ModelConfig
from flexi_jest.models import DualEncoder, Tokenizer
from flexi_jest.models.flexivit import embed_patches

SMALL = ModelConfig(image_size=32, patch_size=8, vision_width=48, vision_depth=2, vision_heads=3,
                    text_width=32, text_depth=1, text_heads=2, context_length=12, embed_dim=16)


def tower() -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(SMALL).eval()


def resize_patches(patches: torch.Tensor, size: int) -> torch.Tensor:
    """The resize PI-resize inverts: bicubic with antialias, as timm's resampling matrix is built."""
    return F.interpolate(patches, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


@pytest.mark.parametrize("new_size", [8, 9, 12, 16, 24, 32])
def test_resized_patch_with_resampled_kernel_gives_the_same_token(new_size):
    """FlexiViT's defining property: <resize(x), PI-resize(w)> == <x, w> for upsampling resizes."""
    model = tower()
    patches = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(new_size))
    with torch.no_grad():
        original = F.conv2d(patches, model.visual.conv1.weight)  # [20, width, 1, 1]
        resized = F.conv2d(resize_patches(patches, new_size), model.patch_kernel(new_size))
    assert torch.allclose(original, resized, atol=1e-3, rtol=1e-3)


def test_downsampled_kernel_is_a_least_squares_fit_not_exact():
    """Downsampling a patch (8 -> 4) loses information, so no 4x4 kernel keeps every token. With R the resize
    ([16, 64] on flattened patches), the token error on a patch x is <x, w> - <R x, w'> = <x, w - R^T w'>, whose
    mean square over white-noise patches is ||w - R^T w'||^2: PI-resize gives the w' that minimises it."""
    model = tower()
    base, small = 8, 4
    basis = torch.eye(base * base).reshape(base * base, 1, base, base)
    resize = resize_patches(basis, small).reshape(base * base, small * small).T  # [16, 64]: R @ patch
    kernel = model.patch_kernel(small).detach()
    assert kernel.shape == (48, 3, small, small)
    weight = model.visual.conv1.weight.detach().reshape(-1, base * base)  # [48 * 3, 64], one row per channel pair
    fitted = kernel.reshape(-1, small * small)  # [48 * 3, 16]
    best = torch.linalg.lstsq(resize.T.double(), weight.T.double()).solution.T.float()  # argmin ||w - R^T w'||
    assert torch.allclose(fitted, best, atol=1e-4, rtol=1e-4)
    residual = weight - fitted @ resize  # w - R^T w'
    assert torch.allclose(residual @ resize.T, torch.zeros(weight.shape[0], small * small), atol=1e-4)  # normal eq.
    assert residual.norm() > 0.1 * weight.norm()  # not exact: tokens of downsampled patches do change
    patches = torch.randn(4000, 3, base, base, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = F.conv2d(patches, model.visual.conv1.weight) - F.conv2d(resize_patches(patches, small), kernel)
        shifted = kernel + 0.05 * kernel.std() * torch.randn(kernel.shape, generator=torch.Generator().manual_seed(1))
        worse = F.conv2d(patches, model.visual.conv1.weight) - F.conv2d(resize_patches(patches, small), shifted)
    assert error.square().mean() < worse.square().mean()  # on sampled patches too, a perturbed kernel does worse


def test_resampling_matrix_is_cached_per_size():
    model = tower()
    model.patch_kernel(16)
    model.patch_kernel(16)
    model.patch_kernel(4)
    sizes = {key[0] for key in model.kernel_resampler._pinv_cache_map}
    assert sizes == {(16, 16), (4, 4)}


@pytest.mark.parametrize("patch", [4, 8, 16, 32])
def test_one_set_of_weights_any_patch_size(patch):
    model = tower()
    images = torch.randn(2, 3, 32, 32)
    tokens = embed_patches(model.visual, model.kernel_resampler, images, patch)
    assert tokens.shape == (2, 1 + (32 // patch) ** 2, 48)  # the class token, then the patches
    assert model.image_features(images, patch).shape == (2, 16)


def test_base_patch_is_exactly_open_clips_forward():
    """At the base patch size the flexible tower is open_clip's own VisionTransformer.forward, bit for bit."""
    model = tower()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.image_features(images), model.clip.visual(images))
        assert torch.equal(model.image_features(images, 8), model.clip.visual(images))


def test_gradients_reach_the_base_kernel_from_any_patch_size():
    model = tower().train()
    model.image_features(torch.randn(2, 3, 32, 32), 16).sum().backward()
    assert model.visual.conv1.weight.grad is not None and model.visual.conv1.weight.grad.abs().sum() > 0
    assert model.visual.positional_embedding.grad.abs().sum() > 0


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="must divide"):
        tower().image_features(torch.randn(1, 3, 32, 32), 6)


def test_dual_encoder_outputs_unit_embeddings():
    cfg = MODEL_PRESETS["tiny"]
    model = DualEncoder(cfg).eval()
    tokenizer = Tokenizer(cfg)
    tokens = tokenizer(["a small red triangle", "a large blue circle above a green star"])
    assert tokens.shape == (2, cfg.context_length)
    with torch.no_grad():
        image_emb, text_emb = model(torch.randn(2, 3, 32, 32), tokens, 16)
    assert image_emb.shape == text_emb.shape == (2, cfg.embed_dim)
    assert torch.allclose(image_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    assert model.logit_bias.item() == -10.0


def test_model_config_validation_names_the_field():
    with pytest.raises(ValueError, match="patch_size 7 must divide image_size 32"):
        ModelConfig(patch_size=7)
    with pytest.raises(ValueError, match="vision_width"):
        ModelConfig(vision_width=100, vision_heads=3)


def test_fixed_init_matches_stored_numbers():
    """A silent numerical change (init, resampling, pooling) changes these numbers."""
    torch.manual_seed(1234)
    model = DualEncoder(MODEL_PRESETS["tiny"]).eval()
    images = torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        out = model.encode_image(images, 16)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out[:, :4], STORED_IMAGE_EMBEDDING, atol=1e-4, rtol=1e-4)


# From torch 2.14.1 / timm 1.0.31 / open_clip 3.3.0 on the CPU, seed 1234 (recorded when the open_clip
# tower replaced the hand-built FlexiViT).
STORED_IMAGE_EMBEDDING = torch.tensor([
    [-0.162677, -0.231874, 0.002453, 0.028408],
    [0.088415, 0.186783, 0.019198, -0.120864],
])


# ---- open_clip's TimmModel around a timm VisionTransformer trunk (SigLIP's image tower) ----------------------

TIMM_CLIPS = ["test-tiny-siglip-timm", "test-tiny-timm-registers"]  # timm_towers.py


@pytest.fixture(scope="module")
def timm_clips(tmp_path_factory):
    from timm_towers import register_timm_clip_configs
    return register_timm_clip_configs(tmp_path_factory.mktemp("timm_clip_configs"))


def timm_pair(name: str) -> tuple[DualEncoder, torch.nn.Module]:
    """(ours, open_clip's model of the same name), the same weights (open_clip's init, seed 0)."""
    import open_clip
    torch.manual_seed(0)
    theirs = open_clip.create_model(name).eval()
    ours = DualEncoder(ModelConfig(name=name)).eval()
    ours.clip.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("name", TIMM_CLIPS)
def test_a_timm_tower_at_its_base_patch_is_open_clips_forward(timm_clips, name):
    ours, theirs = timm_pair(name)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = theirs.encode_image(images, normalize=True)
        for patch in (None, 8):
            torch.testing.assert_close(ours.encode_image(images, patch), expected)  # fp32 tolerance
    difference = (ours.encode_image(images) - expected).abs().max().item()
    print(f"{name} base patch, max abs diff of embeddings: {difference:.3g}")


@pytest.mark.parametrize("name", TIMM_CLIPS)
@pytest.mark.parametrize("patch", [4, 16])
def test_a_timm_tower_at_another_patch_is_timms_own_model_built_at_that_patch(timm_clips, name, patch):
    """Independent of flexivit.py: timm builds the trunk at patch p and loads the base weights through its own
    checkpoint filter (resample_patch_embed: PI-resize; resample_abs_pos_embed); open_clip's head follows."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    ours, theirs = timm_pair(name)
    trunk = theirs.visual.trunk
    import open_clip
    timm_name = open_clip.get_model_config(name)["vision_cfg"]["timm_model_name"]
    resized = timm.create_model(timm_name, patch_size=patch,
                                num_classes=trunk.num_classes, global_pool=trunk.global_pool).eval()
    resized.load_state_dict(checkpoint_filter_fn(trunk.state_dict(), resized))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = theirs.visual.head(resized(images))
        flexible = ours.image_features(images, patch)
    difference = (flexible - expected).abs().max().item()
    print(f"{name} patch {patch} vs timm's model at that patch: max abs diff {difference:.3g}")
    torch.testing.assert_close(flexible, expected)  # fp32 tolerance (measured: 0, bit for bit)


def test_a_timm_towers_tokens_and_gradients_at_any_patch(timm_clips):
    from flexi_jest.models.flexivit import embed_patches_timm
    model = DualEncoder(ModelConfig(name="test-tiny-timm-registers")).train()
    images = torch.randn(2, 3, 32, 32)
    for patch in (4, 8, 16, 32):  # a class token and 2 register tokens, then the patches
        assert embed_patches_timm(model.visual, model.kernel_resampler, images,
                                  patch).shape == (2, 3 + (32 // patch) ** 2, 48)
    model.image_features(images, 16).sum().backward()
    trunk = model.visual.trunk
    for parameter in (trunk.patch_embed.proj.weight, trunk.pos_embed, trunk.cls_token, trunk.reg_token):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert model.patch_kernel(16).shape == (48, 3, 16, 16)
    with pytest.raises(ValueError, match="must divide"):
        model.image_features(images, 6)


def test_siglip_vit_b16_image_tower_runs_flexibly_and_is_open_clips_at_patch_16():
    """open_clip's ViT-B-16-SigLIP image tower (timm's vit_base_patch16_siglip_224, MAP head), random weights.
    (The whole model is refused: its text side needs a Hugging Face tokenizer from the hub.)"""
    import open_clip
    from open_clip.model import _build_vision_tower

    from flexi_jest.models import flexivit
    config = open_clip.get_model_config("ViT-B-16-SigLIP")
    torch.manual_seed(0)
    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"]).eval()
    resampler = flexivit.kernel_resampler(visual)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = visual(images)
        ours = flexivit.image_features(visual, resampler, images, 16)
        torch.testing.assert_close(ours, expected)
        print(f"ViT-B-16-SigLIP image tower, patch 16: max abs diff {(ours - expected).abs().max().item():.3g}")
        assert flexivit.image_features(visual, resampler, images, 32).shape == (1, 768)
