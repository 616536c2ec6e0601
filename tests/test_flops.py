import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flexi_jest import flops
from flexi_jest.config import MODEL_PRESETS, ModelConfig
from flexi_jest.models import DualEncoder

SMALL = ModelConfig(image_size=32, patch_size=8, vision_width=48, vision_depth=2, vision_heads=3,
                    text_width=32, text_depth=2, text_heads=2, context_length=12, embed_dim=24)


def counted_forward_flops(fn, exclude: str | None = None) -> int:
    """FLOPs counted by torch's FlopCounterMode (multiply-add = 2), with SDPA on its math path so the
    attention products are visible to the counter; `exclude` drops a submodule's counts. Autograd stays on,
    as in training: without it nn.MultiheadAttention may take its fused inference path, which the counter
    does not see (the FLOPs are the same)."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    total = counter.get_total_flops()
    if exclude:
        total -= sum(counter.get_flop_counts().get(exclude, {}).values())
    return total


@pytest.mark.parametrize("cfg", [SMALL, MODEL_PRESETS["tiny"]], ids=["small", "tiny"])
@pytest.mark.parametrize("patch", [4, 8, 16])
def test_image_flops_match_flop_counter(cfg, patch):
    model = DualEncoder(cfg).eval()
    batch = 3
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    # the kernel resampling is per call, not per image: excluded from per-image FLOPs
    counted = counted_forward_flops(lambda: model.image_features(images, patch),
                                    exclude="PatchEmbedResamplerFixedOrigSize")
    assert counted == batch * flops.image_forward_flops(cfg, patch)


def test_a_named_open_clip_models_flops_match_flop_counter():
    """The accounting follows the architecture chosen by name (open_clip's ViT-S-16: class-token pooling)."""
    cfg = ModelConfig(name="ViT-S-16")
    model = DualEncoder(cfg).eval()
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    for patch in (16, 32):
        counted = counted_forward_flops(lambda: model.image_features(images, patch),
                                        exclude="PatchEmbedResamplerFixedOrigSize")
        assert counted == flops.image_forward_flops(cfg, patch)
    tokens = torch.randint(0, 1000, (1, cfg.context_length))
    assert counted_forward_flops(lambda: model.encode_text(tokens)) == flops.text_forward_flops(cfg)


@pytest.mark.parametrize("cfg", [SMALL, MODEL_PRESETS["tiny"]], ids=["small", "tiny"])
def test_text_flops_match_flop_counter(cfg):
    model = DualEncoder(cfg).eval()
    tokens = torch.randint(0, 1000, (2, cfg.context_length))
    assert counted_forward_flops(lambda: model.encode_text(tokens)) == 2 * flops.text_forward_flops(cfg)


def test_patch_32_costs_about_28_percent_of_patch_16_for_vit_b():
    cfg = MODEL_PRESETS["vit_b16"]
    ratio = flops.image_forward_flops(cfg, 32) / flops.image_forward_flops(cfg, 16)
    assert 0.2 < ratio < 0.3  # the paper: about 72 % fewer FLOPs (docs/method.md#the-economics)


def test_training_step_is_three_forwards_split_over_patch_sizes():
    cfg = SMALL
    step = flops.training_step_flops(cfg, 10, [8, 16])
    forward = 5 * flops.image_forward_flops(cfg, 8) + 5 * flops.image_forward_flops(cfg, 16)
    forward += 10 * flops.text_forward_flops(cfg) + flops.sigmoid_loss_flops(10, cfg.embed_dim)
    assert step == 3 * forward


def test_ledger_totals_all_parts():
    from flexi_jest.config import FlopsBreakdown
    ledger = flops.add(FlopsBreakdown(reference_training=5.0), learner_scoring=1.0, learner_training=2.0)
    ledger = flops.add(ledger, reference_caching=3.0)
    assert ledger.total == 11.0


def test_scoring_flops_by_method():
    cfg = SMALL
    forward = 100 * flops.pair_forward_flops(cfg, 16)
    joint = flops.scoring_step_flops(cfg, 100, 16, 20, "joint", True, reference_dim=8)
    assert joint == forward + 4 * 100 * 20 * (cfg.embed_dim + 8)
    independent = flops.scoring_step_flops(cfg, 100, 16, 20, "independent", True, reference_dim=8)
    assert independent == forward + 2 * 100 * (cfg.embed_dim + 8)
    assert flops.scoring_step_flops(cfg, 100, 16, 20, "joint", uses_learner=False, reference_dim=8) == 4 * 100 * 20 * 8


def test_pipeline_baselines_get_the_main_learners_total_flop_budget(shapes_data, reference_cache):
    """baseline_budget "flops": a baseline's steps spend the main learner's total (its steps x step FLOPs + the
    reference's share), less the share where the baseline uses the reference (the offline filter: plus its cosines)."""
    from conftest import TEST_MODEL
    from flexi_jest.config import ConfigError, stage_config
    from flexi_jest.pipeline_support import baseline_values

    common = dict(model=TEST_MODEL.model_dump(), pool=shapes_data.splits["pool"].path, super_batch_size=80,
                  reference_cache=reference_cache.cache_dir, reference_training_flops=4e9,
                  reference_caching_flops=1e9, out_dir="unused", steps=10)
    main = {**common, "method": "joint", "score": "learnability"}
    dim = TEST_MODEL.embed_dim
    budget = 10 * flops.learner_step_flops(stage_config("train-learner", "tiny", main), dim) + 5e9
    uniform = baseline_values({**common, "method": "uniform"}, main, "tiny", "flops")
    uniform_step = flops.learner_step_flops(stage_config("train-learner", "tiny", uniform), dim)
    assert uniform["steps"] == round(budget / uniform_step) and uniform["steps"] > 10
    offline = baseline_values({**common, "method": "offline-filter"}, main, "tiny", "flops")
    share = 5e9 + flops.offline_filter_flops(reference_cache.num_samples, dim)
    assert offline["steps"] == max(1, round((budget - share) / uniform_step)) < uniform["steps"]
    # a main learner that does not use the reference (hard_learner) leaves no share in the budget
    hard = {**main, "score": "hard_learner"}
    hard_budget = 10 * flops.learner_step_flops(stage_config("train-learner", "tiny", hard), dim)
    assert baseline_values({**common, "method": "uniform"}, hard, "tiny", "flops")["steps"] == round(
        hard_budget / uniform_step)
    assert baseline_values({**common, "method": "uniform"}, main, "tiny", "steps")["steps"] == 10
    # "learner-flops" (the paper's count): the main learner's own FLOPs only, whoever uses the reference
    learner_budget = 10 * flops.learner_step_flops(stage_config("train-learner", "tiny", main), dim)
    for method in ("uniform", "offline-filter"):
        assert baseline_values({**common, "method": method}, main, "tiny", "learner-flops")["steps"] == round(
            learner_budget / uniform_step) < uniform["steps"]
    with pytest.raises(ConfigError, match="baseline_budget must be one of"):
        baseline_values(common, main, "tiny", "flop")


@pytest.fixture(scope="module")
def timm_clips(tmp_path_factory):
    from timm_towers import register_timm_clip_configs
    return register_timm_clip_configs(tmp_path_factory.mktemp("timm_clip_configs"))


@pytest.mark.parametrize("name", ["test-tiny-siglip-timm", "test-tiny-timm-registers"])
def test_a_timm_towers_flops_match_flop_counter(timm_clips, name):
    """open_clip's TimmModel around a timm ViT (timm_towers.py): SigLIP's shape (no class token, MAP head, no
    projection) and a class token + 2 register tokens with a linear projection, at the base patch and others."""
    cfg = ModelConfig(name=name)
    model = DualEncoder(cfg).eval()
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    for patch in (8, 16, 4):
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.image_features(images, patch)
        counts = {module: sum(by_op.values()) for module, by_op in counter.get_flop_counts().items()}
        assert counts["Global"] - counts.get("PatchEmbedResamplerFixedOrigSize",
                                             0) == 2 * flops.image_forward_flops(cfg, patch)
        patches = (cfg.image_size // patch) ** 2
        assert counts.get("AttentionPoolLatent", 0) == (2 * flops.map_pool_flops(patches, cfg.vision_width)
                                                        if cfg.vision_map_pool else 0)
    tokens = torch.randint(0, 1000, (1, cfg.context_length))
    assert counted_forward_flops(lambda: model.encode_text(tokens)) == flops.text_forward_flops(cfg)


def test_siglip_vit_b16_flops_match_flop_counter():
    """open_clip's ViT-B-16-SigLIP, built on the meta device (shapes only): its image tower at the base patch 16
    (timm's kernel resampling does not run there, so other patch sizes are checked on the tiny towers above)
    and its text tower (no causal mask, last-token pooling, a projection with bias: the bias is element-wise).
    Its Hugging Face tokenizer is not needed for either."""
    from flexi_jest.models import build_open_clip
    from flexi_jest.models.flexivit import image_features, kernel_resampler
    cfg = ModelConfig(name="ViT-B-16-SigLIP")
    with torch.device("meta"):
        model = build_open_clip(cfg)
    assert model.text.pool_type == "last" and model.text.attn_mask is None
    assert model.text.text_projection.bias is not None
    images = torch.empty(1, 3, 224, 224, device="meta")
    assert counted_forward_flops(lambda: image_features(model.visual, kernel_resampler(model.visual), images, 16)) == \
        flops.image_forward_flops(cfg, 16)
    tokens = torch.zeros(1, cfg.context_length, dtype=torch.long, device="meta")
    assert counted_forward_flops(lambda: model.encode_text(tokens)) == flops.text_forward_flops(cfg)
    assert flops.image_forward_flops(cfg, 16) == pytest.approx(35.4e9, rel=1e-3)  # ~17.7 GMACs
    assert flops.text_forward_flops(cfg) == pytest.approx(11.0e9, rel=1e-2)  # 64 tokens x 12 blocks of width 768
