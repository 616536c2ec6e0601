"""Evaluation on the layouts teams evaluate with: ImageFolder, CLIP_benchmark's webdataset layout, plain tars,
the project's splits; several named sets per call; and our metrics against CLIP_benchmark's own on the same
model and data.

The fixtures are made from the generated shapes eval split (the session's briefly trained reference scores above
zero on them): the CLIP_benchmark classification set is written by clip_benchmark's own exporter
(`convert_dataset`), the retrieval set in the layout its `build_wds_dataset` reads (several captions a sample, one
a line; dataset_type.txt 'retrieval'), the ImageFolder as torchvision's ImageFolder reads it.
"""

import io
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import BOTH_S3
from flexi_jest import storage
from flexi_jest.checkpoint import load_model
from flexi_jest.cli import main as cli_main
from flexi_jest.config import EvalSet, EvaluateConfig, EvaluateResult, SplitMetrics
from flexi_jest.data.eval_sets import EvalSetError, assign_names, fill_template, open_eval_set
from flexi_jest.data.transforms import ImageTransform
from flexi_jest.device import to_model_input
from flexi_jest.evaluate import evaluate, evaluate_model
from flexi_jest.models import Tokenizer
from readers import read_split

# ---- fixtures: one labelled, captioned set in every layout ---------------------------------------------------


@pytest.fixture(scope="module")
def eval_samples(shapes_data):
    """The generated eval split's samples (image uint8 [3, 32, 32], caption, label) and its manifest."""
    path = shapes_data.splits["eval"].path
    manifest = json.loads(Path(path, "manifest.json").read_text())
    return [(s["key"], s["image"], s["caption"], s["meta"]["label"]) for s in read_split(path)], manifest


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def webp(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="webp", lossless=True)
    return buffer.getvalue()


class LabelledImages(torch.utils.data.Dataset):
    """(PIL image, class index) pairs with .classes and .templates, as clip_benchmark's exporter takes them."""

    def __init__(self, samples, classes, templates):
        self.items = [(to_pil(image), classes.index(label)) for _, image, _, label in samples]
        self.classes, self.templates = classes, templates

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def write_clip_benchmark_classification(root: Path, samples, manifest) -> Path:
    """CLIP_benchmark's exporter writes root/test/{0..n}.tar (.webp + .cls), nshards.txt, classnames.txt and
    zeroshot_classification_templates.txt; the templates written in its '{c}' form."""
    import warnings

    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    templates = [t.replace("{}", "{c}") for t in manifest["templates"]]
    dataset = LabelledImages(samples, manifest["classes"], templates)
    dataset.items = [(PIL_to_bytes("webp")(image), label) for image, label in dataset.items]
    with warnings.catch_warnings():  # its DataLoader asks for 8 workers, more than a small machine suggests
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        convert_dataset(dataset, "test", str(root), image_format="webp", max_count=120, verbose=False)
    return root


def unique_captions(samples) -> list[list[str]]:
    """Two captions an image, none shared with another image (CLIP_benchmark's positives are the image's own)."""
    return [[f"{caption} number {i}", f"picture {i}: {caption}"] for i, (_, _, caption, _) in enumerate(samples)]


def write_clip_benchmark_retrieval(root: Path, samples) -> Path:
    (root / "test").mkdir(parents=True)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=120, verbose=0) as sink:
        for (key, image, _, _), captions in zip(samples, unique_captions(samples)):
            sink.write({"__key__": key, "webp": webp(image), "txt": "\n".join(captions)})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def write_imagefolder(root: Path, samples) -> Path:
    for key, image, _, label in samples:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        to_pil(image).save(folder / f"{key}.png")
    return root


def write_plain_tars(root: Path, samples, with_labels: bool = False) -> Path:
    """img2dataset-style tars: .jpg-less here (png), .txt, .json with a 'key'; no manifest."""
    root.mkdir(parents=True)
    with wds.TarWriter(str(root / "00000.tar")) as sink:
        for key, image, caption, label in samples:
            meta = {"key": key, **({"label": label} if with_labels else {})}
            buffer = io.BytesIO()
            to_pil(image).save(buffer, format="png")
            sink.write({"__key__": key, "png": buffer.getvalue(), "txt": caption, "json": json.dumps(meta)})
    return root


@pytest.fixture(scope="module")
def layouts(eval_samples, tmp_path_factory):
    samples, manifest = eval_samples
    root = tmp_path_factory.mktemp("layouts")
    return {
        "wds_classification": write_clip_benchmark_classification(root / "wds_shapes", samples, manifest),
        "wds_retrieval": write_clip_benchmark_retrieval(root / "wds_shapes_captions", samples),
        "imagefolder": write_imagefolder(root / "imagefolder", samples),
        "tars": write_plain_tars(root / "pool" / "a", samples),
        "tars_sibling": write_plain_tars(root / "pool" / "b", samples[:50]),
    }


# ---- units -----------------------------------------------------------------------------------------------------


def test_templates_take_both_placeholders():
    assert fill_template("a photo of a {c}.", "cat") == fill_template("a photo of a {}.", "cat") == "a photo of a cat."
    assert fill_template("{c} {not a field}", "dog") == "dog {not a field}"  # no KeyError on other braces
    with pytest.raises(EvalSetError, match="no '{c}' or '{}'"):
        fill_template("a photo", "cat")


def test_eval_set_specs():
    assert EvalSet.parse("imagenet-val=/data/val") == EvalSet(name="imagenet-val", uri="/data/val")
    assert EvalSet.parse("/data/val").name is None
    assert EvalSet.parse("s3://bucket/k=v/x").uri == "s3://bucket/k=v/x"  # '/' or ':' before '=': no name
    assert EvalSet.parse({"uri": "/d", "classnames": "/c.txt"}).classnames == "/c.txt"
    with pytest.raises(ValueError, match="names must be unique"):
        EvaluateConfig(eval_data=["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="champion_metric"):
        EvaluateConfig(champion_metric="top1")


def test_split_metrics_never_hold_a_silent_none():
    retrieval = dict(image_to_text_r1=0.5, image_to_text_r5=1.0, image_to_text_r10=1.0,
                     text_to_image_r1=0.5, text_to_image_r5=1.0, text_to_image_r10=1.0)
    with pytest.raises(ValueError, match="classification_skipped"):
        SplitMetrics(num_samples=2, num_classes=0, **retrieval)
    ok = SplitMetrics(num_samples=2, num_classes=0, classification_skipped="no labels", **retrieval)
    assert ok.top1 is None and ok.classification_skipped == "no labels"


def test_unnamed_sets_under_one_parent_get_distinct_names(layouts, tmp_path):
    sets = [open_eval_set(EvalSet.parse(str(layouts[k]))) for k in ("tars", "tars_sibling")]
    assert assign_names(sets) == ["a", "b"]  # both used to be reported as 'pool', one overwriting the other
    twice = [open_eval_set(EvalSet.parse(str(layouts["tars"]))) for _ in range(3)]
    assert assign_names(twice) == ["a", "pool-a", f"{layouts['tars'].parent.parent.name}-pool-a"]
    named = [open_eval_set(EvalSet.parse(f"a={layouts['tars_sibling']}")),
             open_eval_set(EvalSet.parse(str(layouts['tars'])))]
    assert assign_names(named) == ["a", "pool-a"]  # a user's name wins; the derived one steps aside
    split = [open_eval_set(EvalSet.parse(str(layouts["wds_classification"] / "test")))]
    assert assign_names(split) == ["wds_shapes-test"]  # a folder called 'test' is named with its parent


def test_layouts_are_detected(layouts, shapes_data):
    found = {k: open_eval_set(EvalSet.parse(str(v))) for k, v in layouts.items()}
    assert {k: s.layout for k, s in found.items()} == {
        "wds_classification": "clip_benchmark", "wds_retrieval": "clip_benchmark", "imagefolder": "imagefolder",
        "tars": "webdataset", "tars_sibling": "webdataset"}
    assert found["wds_classification"].templates[0] == "{c}" and len(found["wds_classification"].classnames) == 48
    assert found["wds_retrieval"].multi_caption and found["wds_retrieval"].classnames is None
    assert found["imagefolder"].classnames_source == "folder names"
    assert open_eval_set(EvalSet.parse(shapes_data.splits["eval"].path)).layout == "flexi-jest"


def test_bad_eval_sets_fail_naming_the_set(layouts, tmp_path):
    (tmp_path / "readme.md").write_text("nothing to evaluate\n")
    with pytest.raises(EvalSetError, match=f"eval set '{tmp_path}': cannot tell its layout"):
        open_eval_set(EvalSet(uri=str(tmp_path)))
    missing = tmp_path / "nope"
    with pytest.raises(EvalSetError, match=f"eval set '{missing}'.*not a directory"):
        open_eval_set(EvalSet(uri=str(missing)))
    pattern = open_eval_set(EvalSet(uri=str(layouts["wds_classification"] / "test" / "{0..1}.tar")))
    assert pattern.layout == "webdataset" and len(pattern.shard_urls) == 2 and len(pattern.classnames) == 48
    with pytest.raises(EvalSetError, match=r"missing shard .*/2.tar \(and 5 more of 8\)"):
        open_eval_set(EvalSet(uri=str(layouts["wds_classification"] / "test" / "{0..7}.tar")))
    wrong = tmp_path / "classnames.txt"
    wrong.write_text("cat\ndog\n")
    with pytest.raises(EvalSetError, match="2 class names .* for 4[0-9] class folders"):
        open_eval_set(EvalSet(uri=str(layouts["imagefolder"]), classnames=str(wrong)))


# ---- evaluation on every layout ----------------------------------------------------------------------------------


def test_every_layout_in_one_call_each_under_its_name(reference, shapes_data, layouts):
    sets = [shapes_data.splits["eval"].path, f"imagenet-val={layouts['imagefolder']}",
            f"wds-shapes={layouts['wds_classification']}", str(layouts["wds_retrieval"]), str(layouts["tars"])]
    result = evaluate(EvaluateConfig(model=reference.checkpoint, eval_data=sets, champion_metric="imagenet-val.top1"))
    splits = result.splits
    assert list(splits) == ["shapes", "imagenet-val", "wds-shapes", "wds_shapes_captions", "a"]
    # the same images, classes and templates ({} in the manifest, {c} in CLIP_benchmark's file): the same top-1
    assert splits["wds-shapes"].top1 == splits["shapes"].top1 and splits["wds-shapes"].top5 == splits["shapes"].top5
    assert splits["shapes"].top1 > 0
    assert splits["imagenet-val"].retrieval_skipped == "an ImageFolder has no captions"
    assert splits["imagenet-val"].image_to_text_r1 is None and splits["imagenet-val"].top1 is not None
    assert "no captions" in splits["wds-shapes"].retrieval_skipped
    assert "carry no labels" in splits["wds_shapes_captions"].classification_skipped
    assert splits["wds_shapes_captions"].num_texts == 2 * splits["wds_shapes_captions"].num_samples
    assert "carry no labels" in splits["a"].classification_skipped and splits["a"].top1 is None
    assert splits["a"].image_to_text_r1 == splits["shapes"].image_to_text_r1  # the same pairs as the split
    assert result.champion_metric == "imagenet-val.top1" and result.champion_value == splits["imagenet-val"].top1
    assert evaluate(EvaluateConfig(model=reference.checkpoint, eval_data=sets[:1])).champion_metric == "shapes.top1"


def test_own_class_names_and_templates(reference, layouts, tmp_path, eval_samples):
    _, manifest = eval_samples
    folders = sorted(manifest["classes"])  # the ImageFolder's classes, in folder order
    (tmp_path / "names.txt").write_text("\n".join(f"{name} thing" for name in folders))
    (tmp_path / "templates.json").write_text(json.dumps(["a {c} drawn here."]))
    spec = {"name": "mine", "uri": str(layouts["imagefolder"]), "classnames": str(tmp_path / "names.txt"),
            "templates": str(tmp_path / "templates.json")}
    opened = open_eval_set(EvalSet.parse(spec))
    assert opened.classnames[0] == f"{folders[0]} thing" and opened.templates == ["a {c} drawn here."]
    result = evaluate(EvaluateConfig(model=reference.checkpoint, eval_data=[spec]))
    assert result.splits["mine"].num_classes == 48 and result.splits["mine"].top1 is not None


def test_plain_tars_with_labels_need_class_names(reference, eval_samples, tmp_path):
    samples, manifest = eval_samples
    root = write_plain_tars(tmp_path / "labelled", samples[:40], with_labels=True)
    model, _ = load_model(reference.checkpoint)
    skipped = evaluate_model(model, [str(root)])["labelled"]
    assert "no class names" in skipped.classification_skipped and skipped.image_to_text_r1 is not None
    (root / "classnames.txt").write_text("\n".join(manifest["classes"]))
    scored = evaluate_model(model, [str(root)])["labelled"]
    assert scored.top1 is not None and scored.classification_skipped is None
    (root / "00000_stats.json").write_text(json.dumps({"successes": 40}))  # img2dataset's count beside its shard
    # a brace pattern, named by its folder
    pattern = evaluate_model(model, [f"{root}/{{00000..00000}}.tar"])["labelled"]
    assert pattern.layout == "webdataset" and pattern.expected_samples == 40 and pattern.shortfall == 0
    assert pattern.top1 == scored.top1
    (root / "classnames.txt").write_text("\n".join(manifest["classes"][:3]))
    with pytest.raises(EvalSetError, match="label .* is not one of its 3 classes"):
        evaluate_model(model, [str(root)])


def test_cli_evaluate_on_named_sets(reference, layouts, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli_main(["evaluate", "--set", f"model={reference.checkpoint}", "--set",
                     f'eval_data=["imagenet-val={layouts["imagefolder"]}", "wds={layouts["wds_classification"]}"]',
                     "--set", f"out_path={out}", "--set", "champion_metric=wds.top1"])
    assert code == 0
    result = EvaluateResult.model_validate_json(out.read_text())
    assert set(result.splits) == {"imagenet-val", "wds"} and result.champion_metric == "wds.top1"
    assert json.loads(capsys.readouterr().out)["splits"]["imagenet-val"]["layout"] == "imagefolder"
    missing = tmp_path / "no-such-set"
    assert cli_main(["evaluate", "--set", f"model={reference.checkpoint}", "--set", f"eval_data=[x={missing}]"]) == 2
    assert capsys.readouterr().err.strip() == f"evaluate: eval set '{missing}': not a directory: {missing}"
    own = f"[{{name: mine, uri: {layouts['imagefolder']}, templates: {tmp_path / 't.txt'}}}]"  # YAML flow mapping
    (tmp_path / "t.txt").write_text("a {c} here\n")
    assert cli_main(["evaluate", "--set", f"model={reference.checkpoint}", "--set", f"eval_data={own}"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["mine"]["num_classes"] >= 40


@BOTH_S3
def test_eval_sets_on_s3_score_as_they_do_locally(reference, layouts, s3):
    model, _ = load_model(reference.checkpoint)
    for key in ("imagefolder", "wds_classification"):
        local = Path(layouts[key])
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            storage.write_bytes(f"{s3}/{key}/{path.relative_to(local).as_posix()}", path.read_bytes())
    remote = evaluate_model(model, [f"folder={s3}/imagefolder", f"wds={s3}/wds_classification"], max_samples=60)
    here = evaluate_model(model, [f"folder={layouts['imagefolder']}", f"wds={layouts['wds_classification']}"],
                          max_samples=60)
    assert remote["folder"].layout == "imagefolder" and remote["wds"].layout == "clip_benchmark"
    assert {k: m.model_dump(exclude={"uri"}) for k, m in remote.items()} == \
        {k: m.model_dump(exclude={"uri"}) for k, m in here.items()}


def test_generated_split_keeps_its_name_and_metrics(reference, shapes_data):
    """The project's own eval split: named by its dataset, classification and retrieval as before."""
    model, _ = load_model(reference.checkpoint)
    metrics = evaluate_model(model, [shapes_data.splits["eval"].path])["shapes"]
    assert metrics.layout == "flexi-jest" and metrics.num_classes == 48 and metrics.num_texts == metrics.num_samples
    assert metrics.classification_skipped is None and metrics.retrieval_skipped is None


# ---- against CLIP_benchmark ------------------------------------------------------------------------------------------


class ClipBenchmarkModel(torch.nn.Module):
    """Our DualEncoder with the encode_image / encode_text interface CLIP_benchmark's metrics call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, images):
        return self.model.encode_image(images)

    def encode_text(self, tokens):
        return self.model.encode_text(tokens)


def model_transform(image_size: int):
    """The preprocessing ours uses (resize + centre crop, then the model's input scaling), for CLIP_benchmark."""
    crop = ImageTransform(image_size)
    return lambda image: to_model_input(crop(image.convert("RGB"))[None], torch.device("cpu"))[0]


def images_and_captions(batch):
    return torch.stack([image for image, _ in batch]), [captions for _, captions in batch]


def top_k_correct_fraction(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's zeroshot_classification.accuracy, line for line, except that it sums to a 0-d
    array before float(): its float() of a 1-element 1-d array (deprecated since numpy 1.25) is a TypeError
    with this environment's numpy 2.4."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().cpu().numpy()) / len(target) for k in topk]


def test_metrics_match_clip_benchmark(reference, layouts, monkeypatch):
    """CLIP_benchmark's dataset builder reads our fixtures, its metrics score our model; ours must agree:
    top-1 / top-5 / mean per-class recall on its webdataset layout and on an ImageFolder, recall@1/5/10 both
    ways on its retrieval layout (differences allowed: 1e-6, float rounding of means)."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from torchvision.datasets import ImageFolder

    monkeypatch.setattr(zeroshot_classification, "accuracy", top_k_correct_fraction)

    model, _ = load_model(reference.checkpoint, torch.device("cpu"))
    wrapped, tokenizer = ClipBenchmarkModel(model).eval(), Tokenizer(model.cfg)
    transform = model_transform(model.cfg.image_size)
    ours = evaluate_model(model, [f"wds={layouts['wds_classification']}", f"folder={layouts['imagefolder']}",
                                  f"captions={layouts['wds_retrieval']}"], device=torch.device("cpu"))

    wds_set = build_dataset("wds/shapes", root=str(layouts["wds_classification"]), transform=transform, split="test")
    theirs = zeroshot_classification.evaluate(
        wrapped, torch.utils.data.DataLoader(wds_set, batch_size=64), tokenizer, wds_set.classes, wds_set.templates,
        "cpu", amp=False)
    assert 0 < theirs["acc1"] < 1  # neither trivial nor saturated: the comparison says something
    assert ours["wds"].top1 == pytest.approx(theirs["acc1"], abs=1e-6)
    assert ours["wds"].top5 == pytest.approx(theirs["acc5"], abs=1e-6)
    assert ours["wds"].mean_per_class_recall == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)

    folder = ImageFolder(str(layouts["imagefolder"]), transform=transform)
    theirs = zeroshot_classification.evaluate(
        wrapped, torch.utils.data.DataLoader(folder, batch_size=64), tokenizer, folder.classes,
        ["a photo of a {c}."], "cpu", amp=False)
    assert ours["folder"].top1 == pytest.approx(theirs["acc1"], abs=1e-6)
    assert ours["folder"].top5 == pytest.approx(theirs["acc5"], abs=1e-6)
    assert ours["folder"].mean_per_class_recall == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)

    captions = build_dataset("wds/shapes_captions", root=str(layouts["wds_retrieval"]), transform=transform,
                             split="test", task="zeroshot_retrieval")
    theirs = zeroshot_retrieval.evaluate(
        wrapped, torch.utils.data.DataLoader(captions, batch_size=64, collate_fn=images_and_captions), tokenizer,
        "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):  # CLIP_benchmark: image_retrieval = text queries -> images; text_retrieval = image -> texts
        assert ours["captions"].text_to_image_r1 is not None
        assert getattr(ours["captions"],
                       f"text_to_image_r{k}") == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert getattr(ours["captions"],
                       f"image_to_text_r{k}") == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6)
    assert 0 < theirs["image_retrieval_recall@10"] < 1  # neither trivial nor saturated: the comparison says something


# ---- hostile layouts (issue 20's probes) -------------------------------------------------------------------------


def tiny_imagefolder(root: Path) -> Path:
    """2 classes of 2 solid-colour PNGs."""
    for label, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(root / label / f"{label}{i}.png")
    return root


def test_imagefolder_symlink_loops_are_not_followed(tmp_path):
    """Before, `os.walk(followlinks=True)`: a `cat/l1 -> ..` link turned 4 images into 164 with wrong labels, and
    two such links hung evaluation. A link to a directory elsewhere (not up the walk) is still followed."""
    root = tiny_imagefolder(tmp_path / "folder")
    images = ["cat/cat0.png", "cat/cat1.png", "dog/dog0.png", "dog/dog1.png"]
    (root / "cat" / "l1").symlink_to("..")
    assert storage.list_tree(str(root)) == images  # before: 164 paths (the kernel stops the loop at 40 links)
    (root / "cat" / "l2").symlink_to("..")  # two loops: about 2**40 paths on the old walk
    (root / "dog" / "self").symlink_to(".")
    assert storage.list_tree(str(root)) == images
    opened = open_eval_set(EvalSet(uri=str(root)))
    assert opened.image_paths == [(image, image.startswith("dog")) for image in images]
    assert opened.classnames == ["cat", "dog"]
    elsewhere = tiny_imagefolder(tmp_path / "more")
    (root / "bird").symlink_to(elsewhere / "dog")  # a class kept elsewhere, linked in: followed, once
    assert [f for f in storage.list_tree(str(root)) if f.startswith("bird/")] == ["bird/dog0.png", "bird/dog1.png"]


@pytest.mark.parametrize("content, why", [(b"abc\n", "b'abc\\\\n'"), (b"1000000000\n", "b'1000000000\\\\n'"),
                                         (b"0", "b'0'"), (b"-3", "b'-3'"), (b"", "b''"), (b"\xff\xfe", "xff")])
def test_clip_benchmark_nshards_txt_is_validated(tmp_path, content, why):
    """Before, `abc` gave a bare ValueError naming neither the file nor the set, and 1000000000 built a list of that
    length."""
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    with wds.TarWriter(str(root / "test" / "0.tar")) as sink:
        sink.write({"__key__": "k0", "png": b"not read here", "cls": b"0"})
    (root / "test" / "nshards.txt").write_bytes(content)
    (root / "classnames.txt").write_text("cat\n")
    with pytest.raises(EvalSetError, match=rf"eval set '{root}': .*test/nshards.txt must hold a positive shard count "
                                           rf"of at most 100000, got .*{why}"):
        open_eval_set(EvalSet(uri=str(root)))
    (root / "test" / "nshards.txt").write_text("1\n")
    assert open_eval_set(EvalSet(uri=str(root))).layout == "clip_benchmark"
