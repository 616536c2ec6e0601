import pytest
import torch
import torch.nn.functional as F

from flexi_jest.config import MODEL_PRESETS, ModelConfig
from flexi_jest.flexivit import FlexiViT
from flexi_jest.model import DualEncoder, Tokenizer


def tower(**overrides) -> FlexiViT:
    torch.manual_seed(0)
    kwargs = dict(image_size=32, base_patch_size=8, width=48, depth=2, heads=3, output_dim=16)
    kwargs.update(overrides)
    return FlexiViT(**kwargs).eval()


def resize_patches(patches: torch.Tensor, size: int) -> torch.Tensor:
    """The resize PI-resize inverts: bicubic with antialias, as timm's resampling matrix is built."""
    return F.interpolate(patches, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


@pytest.mark.parametrize("new_size", [8, 9, 12, 16, 24, 32])
def test_resized_patch_with_resampled_kernel_gives_the_same_token(new_size):
    """FlexiViT's defining property: <resize(x), PI-resize(w)> == <x, w> for upsampling resizes."""
    model = tower()
    patches = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(new_size))
    with torch.no_grad():
        original = F.conv2d(patches, model.patch_weight)  # [20, width, 1, 1]
        resized = F.conv2d(resize_patches(patches, new_size), model.patch_kernel(new_size))
    assert torch.allclose(original, resized, atol=1e-3, rtol=1e-3)


def test_downsampled_kernel_is_a_least_squares_fit_not_exact():
    model = tower()
    kernel = model.patch_kernel(4)
    assert kernel.shape == (48, 3, 4, 4)


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
    tokens = model.embed_patches(images, patch)
    assert tokens.shape == (2, (32 // patch) ** 2, 48)
    assert model(images, patch).shape == (2, 16)


def test_gradients_reach_the_base_kernel_from_any_patch_size():
    model = tower().train()
    model(torch.randn(2, 3, 32, 32), 16).sum().backward()
    assert model.patch_weight.grad is not None and model.patch_weight.grad.abs().sum() > 0
    assert model.pos_embed.grad.abs().sum() > 0


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="must divide"):
        tower()(torch.randn(1, 3, 32, 32), 6)


def test_dual_encoder_outputs_unit_embeddings():
    cfg = MODEL_PRESETS["tiny"]
    model = DualEncoder(cfg).eval()
    tokenizer = Tokenizer(cfg.context_length)
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


# From torch 2.14.1 / timm 1.0.31 on the CPU, seed 1234 (recorded when the test was written).
STORED_IMAGE_EMBEDDING = torch.tensor([
    [0.150289, 0.054187, 0.172176, -0.025459],
    [-0.126502, 0.111105, -0.088908, -0.191279],
])
