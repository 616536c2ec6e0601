"""Fine-tuning from open_clip checkpoints, the open_clip export, gradient accumulation, precision."""

import json

import open_clip
import pytest
import torch
from open_clip.loss import SigLipLoss

from conftest import BOTH_S3, TEST_MODEL
from flexi_jest.config import MODEL_PRESETS, ModelConfig, TrainLearnerConfig, TrainReferenceConfig
from flexi_jest.device import autocast, to_model_input
from flexi_jest.distributed import World
from flexi_jest.export import CONFIG_FILE, WEIGHTS_FILE, export_open_clip
from flexi_jest.losses import accumulated_loss_backward, multi_patch_loss
from flexi_jest.models import DualEncoder, Tokenizer
from flexi_jest.models.pretrained import CheckpointMismatch, cached_pretrained_file, load_pretrained
from flexi_jest.train import build_loader, train_learner, train_reference

# A CLIP-class open_clip config (text tower inline, class-token pooling, quick_gelu), tiny, registered with
# open_clip as any model config is, so the named-model path is tested without building a 100M-parameter ViT.
TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    directory = tmp_path_factory.mktemp("open_clip_configs")
    (directory / "test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(directory)
    return "test-tiny-clip"


def open_clip_checkpoint(name: str, path, seed: int = 7) -> torch.nn.Module:
    """An open_clip model built by open_clip itself, its state_dict saved to path (the format pretrained= reads)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    torch.save(model.state_dict(), path)
    return model


def first_batch_loss(theirs, cfg, data: str, batch_size: int, tokenizer=None) -> float:
    """open_clip's SigLIP loss of open_clip's model on the first batch a stage draws (same stream, same seed),
    its captions tokenized by `tokenizer` (default: the project's Tokenizer of the stage's model)."""
    with build_loader(cfg, data, cfg.data_mode, batch_size, World()) as loader:
        batch = loader.next_batch()
    images = to_model_input(torch.stack([s["image"] for s in batch]), torch.device("cpu"), cfg.model.mean,
                            cfg.model.std)
    tokens = (tokenizer or Tokenizer(cfg.model))([s["caption"] for s in batch])
    with torch.no_grad():
        image, text = theirs.encode_image(images, normalize=True), theirs.encode_text(tokens, normalize=True)
        return SigLipLoss()(image, text, theirs.logit_scale.exp(), theirs.logit_bias).item()


def test_both_stages_fine_tune_an_open_clip_checkpoint_exactly(shapes_data, tmp_path):
    """The first step's loss is open_clip's own loss of the checkpoint's model on the same batch (exact import)."""
    theirs = open_clip_checkpoint("flexi-jest-tiny", tmp_path / "init.pt")
    common = dict(model="flexi-jest-tiny", init_checkpoint=str(tmp_path / "init.pt"), steps=2, progress=False,
                  log_every=1, device="cpu")
    reference_cfg = TrainReferenceConfig(data=shapes_data.splits["curated"].path, out_dir=str(tmp_path / "ref"),
                                         batch_size=16, **common)
    reference = train_reference(reference_cfg)
    first = json.loads(open(reference.metrics_path).readline())["loss"]
    assert first == pytest.approx(first_batch_loss(theirs, reference_cfg, reference_cfg.data, 16), rel=1e-5, abs=1e-5)

    learner_cfg = TrainLearnerConfig(pool=shapes_data.splits["pool"].path, out_dir=str(tmp_path / "learner"),
                                     method="uniform", super_batch_size=40, filter_ratio=0.8, **common)
    learner = train_learner(learner_cfg)
    first = json.loads(open(learner.metrics_path).readline())["loss"]
    assert first == pytest.approx(first_batch_loss(theirs, learner_cfg, learner_cfg.pool, 8), rel=1e-5, abs=1e-5)


def test_a_named_open_clip_model_imports_exactly_and_exports_to_open_clip(tiny_clip_name, tmp_path):
    theirs = open_clip_checkpoint(tiny_clip_name, tmp_path / "init.pt")
    cfg = ModelConfig(name=tiny_clip_name)
    ours = DualEncoder(cfg).eval()
    load_pretrained(ours, str(tmp_path / "init.pt"))
    images, tokens = torch.randn(3, 3, 32, 32), Tokenizer(ours.cfg)(["a red square", "two blue dots", "a star"])
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), theirs.encode_image(images, normalize=True))
        assert torch.equal(ours.encode_text(tokens), theirs.encode_text(tokens, normalize=True))
        assert ours.encode_image(images, 16).shape == (3, 32)  # the checkpoint's patch 8, resampled to 16
    export_open_clip(ours, str(tmp_path / "export"))
    # the export's config carries the SigLIP bias a CLIP config lacks; by name, open_clip is told to add it
    by_folder, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    by_name, _, _ = open_clip.create_model_and_transforms(tiny_clip_name,
                                                          pretrained=str(tmp_path / "export" / WEIGHTS_FILE),
                                                          init_logit_bias=-10.0)
    with torch.no_grad():
        for loaded in (by_folder.eval(), by_name.eval()):
            assert torch.equal(loaded.encode_image(images, normalize=True), ours.encode_image(images))
            assert torch.equal(loaded.encode_text(tokens, normalize=True), ours.encode_text(tokens))


@BOTH_S3
def test_an_init_checkpoint_on_s3_imports_exactly(tiny_clip_name, tmp_path, s3):
    """init_checkpoint s3://...: the object is read through the project's storage (a real S3 API: moto) and
    imports exactly as the same file does locally."""
    from flexi_jest import storage
    theirs = open_clip_checkpoint(tiny_clip_name, tmp_path / "init.pt")
    storage.upload_file(tmp_path / "init.pt", f"{s3}/models/init.pt")
    ours = DualEncoder(ModelConfig(name=tiny_clip_name)).eval()
    load_pretrained(ours, f"{s3}/models/init.pt")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), theirs.encode_image(images, normalize=True))
    with pytest.raises(Exception, match="models/absent.pt"):
        load_pretrained(ours, f"{s3}/models/absent.pt")


def test_a_checkpoint_that_does_not_fit_names_the_keys_and_shapes(tiny_clip_name, tmp_path):
    open_clip_checkpoint("flexi-jest-tiny", tmp_path / "tiny.pt")
    model = DualEncoder(ModelConfig(name=tiny_clip_name))
    with pytest.raises(CheckpointMismatch, match=r"mismatches, first: missing positional_embedding \(16, 32\);.*"
                       r"visual.class_embedding: checkpoint \(96,\), model \(48,\)"):
        load_pretrained(model, str(tmp_path / "tiny.pt"))
    with pytest.raises(FileNotFoundError, match="neither a file nor a pretrained tag"):
        load_pretrained(model, str(tmp_path / "missing.pt"))


def test_a_pretrained_tag_must_be_in_the_local_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the local open_clip / Hugging Face cache"):
        cached_pretrained_file("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert cached_pretrained_file("ViT-B-32", "no-such-tag", cache_dir=str(tmp_path)) is None


def test_open_clip_loads_a_trained_models_export_with_the_same_embeddings(reference):
    """Every trained model is also an open_clip checkpoint (config + weights); open_clip loads it from its
    folder and embeds as the project's model does, transforms included."""
    from flexi_jest.checkpoint import load_model

    ours, _ = load_model(reference.checkpoint)
    ours.eval()
    config = json.loads(open(f"{reference.open_clip_dir}/{CONFIG_FILE}").read())
    assert config["preprocess_cfg"]["mean"] == list(TEST_MODEL.mean)
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{reference.open_clip_dir}")
    theirs.eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    from PIL import Image
    their_input = torch.stack([preprocess(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    our_input = to_model_input(pixels, torch.device("cpu"), TEST_MODEL.mean, TEST_MODEL.std)
    assert (their_input - our_input).abs().max() < 1e-5
    tokenizer = open_clip.get_tokenizer(f"local-dir:{reference.open_clip_dir}")
    texts = ["a small red triangle", "a large blue circle"]
    with torch.no_grad():
        image_diff = (theirs.encode_image(their_input, normalize=True) - ours.encode_image(our_input)).abs().max()
        text_diff = (theirs.encode_text(tokenizer(texts),
                                        normalize=True) - ours.encode_text(Tokenizer(ours.cfg)(texts))).abs().max()
    print(f"export max abs diff: image {image_diff.item():.3g}, text {text_diff.item():.3g}")
    assert image_diff < 1e-5 and text_diff == 0


@pytest.mark.parametrize("micro_batch", [3, 8])
def test_accumulated_gradients_equal_the_single_batch_gradient(micro_batch):
    torch.manual_seed(0)
    model = DualEncoder(TEST_MODEL)
    images, tokens = torch.randn(8, 3, 32, 32), torch.randint(0, 49408, (8, 16))
    loss = multi_patch_loss(model, images, tokens, [8, 16])
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    accumulated = accumulated_loss_backward(model, images, tokens, [8, 16], micro_batch)
    assert accumulated.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_precision_is_a_config_field():
    cpu = torch.device("cpu")
    assert not autocast(cpu, "fp32")._enabled and not autocast(cpu, "amp")._enabled and autocast(cpu, "bf16")._enabled
    with autocast(cpu, "bf16"):
        assert DualEncoder(
            MODEL_PRESETS["tiny"]).encode_text(torch.zeros(1, 16, dtype=torch.long)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        TrainReferenceConfig(precision="fp16")


@pytest.fixture(scope="module")
def timm_clips(tmp_path_factory):
    from timm_towers import register_timm_clip_configs
    return register_timm_clip_configs(tmp_path_factory.mktemp("timm_clip_configs"))


def test_a_timm_tower_model_imports_trains_and_exports_to_open_clip_exactly(timm_clips, shapes_data, tmp_path):
    """An open_clip model whose image tower is timm's (SigLIP's shape: no class token, MAP head; timm_towers.py):
    its checkpoint loads exactly, both stages train from it (the learner at patch 8 and 16), and the trained
    model's export loads back into open_clip by folder and by name with the same embeddings."""
    from flexi_jest.checkpoint import load_model
    name = "test-tiny-siglip-timm"
    theirs = open_clip_checkpoint(name, tmp_path / "init.pt")
    ours = DualEncoder(ModelConfig(name=name)).eval()
    load_pretrained(ours, str(tmp_path / "init.pt"))
    images, tokens = torch.randn(3, 3, 32, 32), Tokenizer(ours.cfg)(["a red square", "two blue dots", "a star"])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images, normalize=True))
        assert torch.equal(ours.encode_text(tokens), theirs.encode_text(tokens, normalize=True))

    common = dict(model=name, init_checkpoint=str(tmp_path / "init.pt"), steps=2, progress=False, log_every=1,
                  device="cpu")
    reference_cfg = TrainReferenceConfig(data=shapes_data.splits["curated"].path, out_dir=str(tmp_path / "ref"),
                                         batch_size=16, **common)
    reference = train_reference(reference_cfg)
    first = json.loads(open(reference.metrics_path).readline())["loss"]
    assert first == pytest.approx(first_batch_loss(theirs, reference_cfg, reference_cfg.data, 16), rel=1e-5, abs=1e-5)
    learner = train_learner(TrainLearnerConfig(
        pool=shapes_data.splits["pool"].path, out_dir=str(tmp_path / "learner"), method="uniform",
        super_batch_size=40, filter_ratio=0.8, train_patch_sizes=[8, 16], **common))
    assert learner.steps == 2 and learner.final_loss == learner.final_loss  # ran, not NaN

    for result in (reference, learner):
        trained, _ = load_model(result.checkpoint)
        trained.eval()
        assert not torch.equal(trained.visual.trunk.attn_pool.latent, theirs.visual.trunk.attn_pool.latent)  # trained
        by_folder, _, _ = open_clip.create_model_and_transforms(f"local-dir:{result.open_clip_dir}")
        by_name, _, _ = open_clip.create_model_and_transforms(name, pretrained=f"{result.open_clip_dir}/{WEIGHTS_FILE}")
        with torch.no_grad():
            expected_image, expected_text = trained.encode_image(images), trained.encode_text(tokens)
            for loaded in (by_folder.eval(), by_name.eval()):
                image = loaded.encode_image(images, normalize=True)
                difference = (image - expected_image).abs().max().item()
                print(f"{name} export, max abs diff of image embeddings: {difference:.3g}")
                torch.testing.assert_close(image, expected_image)
                assert torch.equal(loaded.encode_text(tokens, normalize=True), expected_text)


def test_a_model_with_a_hugging_face_tokenizer_trains_and_exports_to_open_clip_exactly(shapes_data, tmp_path):
    """ViT-B-16-SigLIP's shape, tiny (timm_towers.register_hf_tokenizer_clip): a Hugging Face tokenizer read from a
    local directory. The reference stage's first loss is open_clip's with open_clip's tokenizer (so the stage
    tokenized as open_clip does), and the export loads back into open_clip, by name and as a `local-dir:` folder
    that carries the tokenizer, with the same tokens and embeddings."""
    from flexi_jest.checkpoint import load_model
    from readers import read_split
    from timm_towers import register_hf_tokenizer_clip
    name = register_hf_tokenizer_clip(tmp_path / "configs")
    their_tokenizer = open_clip.get_tokenizer(name)
    theirs = open_clip_checkpoint(name, tmp_path / "init.pt")
    reference_cfg = TrainReferenceConfig(data=shapes_data.splits["curated"].path, out_dir=str(tmp_path / "ref"),
                                         batch_size=16, model=name, init_checkpoint=str(tmp_path / "init.pt"),
                                         steps=2, progress=False, log_every=1, device="cpu")
    reference = train_reference(reference_cfg)
    first = json.loads(open(reference.metrics_path).readline())["loss"]
    assert first == pytest.approx(first_batch_loss(theirs, reference_cfg, reference_cfg.data, 16, their_tokenizer),
                                  rel=1e-5, abs=1e-5)

    trained, _ = load_model(reference.checkpoint)
    trained.eval()
    texts = [sample["caption"] for _, sample in zip(range(6), read_split(shapes_data.splits["curated"].path, 32))]
    tokens = Tokenizer(trained.cfg)(texts)
    # no <unk>: the vocabulary covers them
    assert torch.equal(tokens, their_tokenizer(texts)) and not tokens.eq(2).any()
    by_name = open_clip.create_model(name, pretrained=f"{reference.open_clip_dir}/{WEIGHTS_FILE}").eval()
    by_folder = open_clip.create_model(f"local-dir:{reference.open_clip_dir}").eval()
    folder_tokenizer = open_clip.get_tokenizer(f"local-dir:{reference.open_clip_dir}")
    assert torch.equal(folder_tokenizer(texts), tokens)
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected_text, expected_image = trained.encode_text(tokens), trained.encode_image(images)
        assert not torch.equal(expected_text, theirs.encode_text(tokens, normalize=True))  # it trained
        for loaded in (by_name, by_folder):
            text, image = loaded.encode_text(tokens, normalize=True), loaded.encode_image(images, normalize=True)
            print(f"{name} export, max abs diff: text {(text - expected_text).abs().max().item():.3g}, "
                  f"image {(image - expected_image).abs().max().item():.3g}")
            torch.testing.assert_close(text, expected_text, rtol=0, atol=0)
            torch.testing.assert_close(image, expected_image)
