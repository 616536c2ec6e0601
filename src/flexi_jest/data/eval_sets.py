"""Eval sets: the layouts zero-shot evaluation reads, each turned into images with a label and captions.

A set's layout is found from what is at its URI (or forced with EvalSet.layout):

    flexi-jest      a split written by make-data: tars + manifest.json, whose `classes` and `templates` go with
                    each sample's .json `label` (a class name)
    clip_benchmark  CLIP_benchmark's webdataset layout (`clip_benchmark_export_wds`): <root>/<split>/0.tar, 1.tar,
                    ... (nshards.txt beside them), each sample an image (.webp/.png/.jpg) with a .cls class index
                    (classification) or a .txt of captions, one a line (retrieval, dataset_type.txt
                    'retrieval'); <root>/classnames.txt and <root>/zeroshot_classification_templates.txt
    webdataset      any other tars: a directory of *.tar (img2dataset's shards: .jpg/.txt/.json), one .tar or a
                    brace pattern of them; a caption from .txt, a label from .cls or the .json's `label`
    imagefolder     class folders of images, as torchvision's ImageFolder reads them: <root>/<class>/**/<image>,
                    classes in sorted folder order, named by their folders unless a classnames file says otherwise

Class names and templates are the set's own (manifest, or classnames.txt / zeroshot_classification_templates.txt
at the root or beside the tars) unless the EvalSet names files of its own. A template holds `{c}`
(CLIP_benchmark's) or `{}` where the class name goes.

Reading is robust as the training data's is (flexi_jest.data.shards): a missing or corrupt shard, an image
that does not decode, is skipped and counted in a ReadStats, never silently dropped.
"""

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

from PIL import Image
from torch import Tensor

from flexi_jest import storage
from flexi_jest.config import EVAL_SET_NAME, EvalSet
from flexi_jest.data.manifest import read_manifest
from flexi_jest.data.shards import IMAGE_EXTENSIONS, ReadStats, caption_text, decode_meta, iter_tar, unusable_raw
from flexi_jest.data.specs import Shard, SpecError, resolve, scheme
from flexi_jest.errors import BadInput

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
DEFAULT_TEMPLATES = ["a photo of a {c}."]
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
GENERIC_FOLDER_NAMES = {"test", "val", "valid", "validation", "eval", "train"}
FETCH_THREADS = 8  # concurrent image reads of an ImageFolder (one GET per image on S3)

Transform = Callable[[Image.Image], Tensor]  # PIL image -> uint8 [3, S, S]


class EvalSetError(ValueError, BadInput):
    """An eval set that cannot be read as asked; the message names the set and the problem."""


@dataclass
class EvalSample:
    """One image of an eval set.

    image:    uint8 [3, S, S], preprocessed
    captions: its captions (none for a classification-only set; CLIP_benchmark retrieval sets have several)
    label:    class index, class name (resolved against the set's class names later), or None
    """

    key: str
    image: Tensor
    captions: list[str]
    label: int | str | None


def fill_template(template: str, classname: str) -> str:
    """A prompt: the class name put where the template says, `{c}` (CLIP_benchmark) or `{}`."""
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    raise EvalSetError(f"template {template!r} has no '{{c}}' or '{{}}' where the class name goes")


def read_list_file(uri: str, what: str) -> list[str]:
    """A classnames or templates file: one entry a line (blank lines dropped), or a JSON list of strings."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except storage.StorageError as exc:
        raise EvalSetError(f"{what} file {uri}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{what} file {uri} is not UTF-8 text: {exc}") from None
    if uri.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{what} file {uri} is not valid JSON: {exc}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise EvalSetError(f"{what} file {uri}: expected a JSON list of strings")
    else:
        values = [line.strip() for line in text.splitlines()]
    values = [v for v in values if v]
    if not values:
        raise EvalSetError(f"{what} file {uri} is empty")
    return values


def _natural_key(name: str) -> list:
    """'10.tar' after '9.tar' (CLIP_benchmark numbers its shards without padding)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def _first_existing(*uris: str) -> str | None:
    return next((uri for uri in uris if storage.exists(uri)), None)


@dataclass
class OpenedEvalSet:
    """An eval set whose layout, shards or images, class names and templates are known; `samples` reads it."""

    spec: EvalSet
    layout: str
    classnames: list[str] | None
    templates: list[str]
    classnames_source: str  # where the class names came from, for the report
    dataset: str | None = None  # the manifest's dataset name (flexi-jest splits)
    multi_caption: bool = False  # a .txt holds one caption a line (CLIP_benchmark retrieval sets)
    shards: list[Shard] = field(default_factory=list)  # tar layouts, with their sample counts where known
    image_paths: list[tuple[str, int]] = field(default_factory=list)  # ImageFolder: (relative path, class index)
    manifest: dict | None = None

    @property
    def uri(self) -> str:
        return self.spec.uri

    @property
    def shard_urls(self) -> list[str]:
        return [shard.url for shard in self.shards]

    @property
    def expected_samples(self) -> int | None:
        """Samples the set holds by its own account: the shards' counts (manifest, img2dataset stats) when
        every one is known, an ImageFolder's images; None when unknown."""
        if self.layout == "imagefolder":
            return len(self.image_paths)
        counts = [shard.num_samples for shard in self.shards]
        return sum(counts) if counts and None not in counts else None

    def samples(self, transform: Transform, stats: ReadStats) -> Iterator[EvalSample]:
        """Every readable sample once, in order; what cannot be read is counted in stats."""
        if self.layout == "imagefolder":
            yield from self._folder_samples(transform, stats)
        else:
            yield from self._tar_samples(transform, stats)

    def _tar_samples(self, transform: Transform, stats: ReadStats) -> Iterator[EvalSample]:
        for shard in self.shards:
            for raw in iter_tar(shard, stats):  # checks the manifest's sha256 and counts, counts damage
                stats.note_key(raw["__key__"], shard.url)
                sample = self._decode_tar_sample(raw, transform, stats)
                if sample is not None:
                    yield sample

    def _decode_tar_sample(self, raw: dict, transform: Transform, stats: ReadStats) -> EvalSample | None:
        """As shards.decode_sample reads a sample (a non-UTF-8 caption, JSON that is not an object, an image that
        does not decode: skipped and counted), plus a label from .cls or the .json, and several captions a
        .txt in CLIP_benchmark's retrieval sets. A sample without .txt is kept, captionless, except in the
        project's own splits, which pair every image with a caption."""
        key = raw["__key__"]
        if unusable_raw(raw, stats):  # a member over its size cap (shards.MEMBER_CAPS), never read
            return None
        image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if not isinstance(image_bytes, bytes):
            stats.record("missing_image", f"{raw.get('__url__', '')}: {key}")
            return None
        text = caption_text(raw["txt"], key, stats) if "txt" in raw else ""
        if text is None:  # not UTF-8, or NUL bytes
            return None
        captions = [line.strip() for line in text.splitlines()] if self.multi_caption else [text.strip()]
        captions = [c for c in captions if c]
        if not captions and (self.layout == "flexi-jest" or "txt" in raw):  # a blank caption is not a caption
            stats.record("empty_caption", key)
            return None
        meta = decode_meta(raw, stats)
        if meta is None:
            return None
        label: int | str | None = None
        if "cls" in raw:
            try:
                label = int(raw["cls"].decode().strip())
            except ValueError:
                stats.record("bad_label", f"{key}: .cls {raw['cls'][:20]!r} is not a class index")
                return None
        else:
            value = meta.get("label")
            label = value if isinstance(value, (int, str)) and not isinstance(value, bool) else None
        image = _decode_image(image_bytes, transform, key, stats)
        if image is None:
            return None
        stats.samples += 1
        return EvalSample(key, image, captions, label)

    def _folder_samples(self, transform: Transform, stats: ReadStats) -> Iterator[EvalSample]:
        def fetch(item: tuple[str, int]) -> tuple[str, int, bytes | None]:
            path, label = item
            try:
                return path, label, storage.read_bytes(storage.join(self.uri, path))
            except storage.StorageError as exc:
                stats.record("missing_image", str(exc))
                return path, label, None

        chunk = FETCH_THREADS * 8
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            for start in range(0, len(self.image_paths), chunk):
                for path, label, data in pool.map(fetch, self.image_paths[start:start + chunk]):
                    stats.note_key(path, self.uri)
                    if data is None:
                        continue
                    image = _decode_image(data, transform, path, stats)
                    if image is not None:
                        stats.samples += 1
                        yield EvalSample(path, image, [], label)


def _decode_image(data: bytes, transform: Transform, key: str, stats: ReadStats) -> Tensor | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return transform(image.convert("RGB"))
    except Exception as exc:  # PIL raises many types for bad data
        stats.record("bad_image", f"{key}: {exc}")
        return None


# ---- finding a set's layout ------------------------------------------------------------------------------------------


def _side_files(spec: EvalSet, *folders: str) -> tuple[list[str] | None, str, list[str] | None]:
    """(class names, their source, templates) from the spec's files, else the first folder holding the
    CLIP_benchmark files."""
    classnames, source = None, "none"
    if spec.classnames:
        classnames, source = read_list_file(spec.classnames, "classnames"), spec.classnames
    else:
        found = _first_existing(*(storage.join(f, CLASSNAMES_FILE) for f in folders))
        if found:
            classnames, source = read_list_file(found, "classnames"), found
    templates = None
    if spec.templates:
        templates = read_list_file(spec.templates, "templates")
    else:
        found = _first_existing(*(storage.join(f, TEMPLATES_FILE) for f in folders))
        if found:
            templates = read_list_file(found, "templates")
    return classnames, source, templates


def _shards(spec: EvalSet, uri: str) -> list[Shard]:
    """The shards of a dataset spec (specs.resolve: a directory, a .tar, a brace pattern, '::', http(s), pipe:),
    with their counts; a spec naming nothing readable is an EvalSetError naming the set."""
    try:
        return list(resolve(uri).shards)
    except SpecError as exc:
        raise EvalSetError(f"eval set {spec.uri!r}: {exc}") from None


def open_eval_set(spec: EvalSet) -> OpenedEvalSet:
    """Find the set's layout and read its class names and templates. Raises EvalSetError naming the set."""
    uri = spec.uri.rstrip("/") or spec.uri
    try:
        if "{" in uri or "::" in uri or uri.endswith(".tar") or scheme(uri) in ("http", "pipe"):
            if spec.layout not in ("auto", "webdataset", "clip_benchmark"):
                raise EvalSetError(f"eval set {spec.uri!r}: a .tar or pattern of tars cannot be read as {spec.layout}")
            shards = _shards(spec, uri)
            folder = _parent(shards[0].url)
            beside = scheme(folder) in ("local", "s3")  # class names and templates beside the tars, where listable
            classnames, source, templates = _side_files(spec, *((folder, _parent(folder)) if beside else ()))
            retrieval = beside and (_is_retrieval_set(folder) or _is_retrieval_set(_parent(folder)))
            return OpenedEvalSet(spec, "webdataset", classnames, templates or DEFAULT_TEMPLATES, source,
                                 shards=shards, multi_caption=retrieval)
        files = storage.list_tree(uri)
    except storage.StorageError as exc:
        raise EvalSetError(f"eval set {spec.uri!r}: {exc}") from None
    top = {f for f in files if "/" not in f}
    layout = spec.layout
    if layout == "auto":
        layout = _detect_layout(spec, files, top)
    if layout == "flexi-jest":
        return _open_flexi_jest(spec, uri)
    if layout == "clip_benchmark":
        return _open_clip_benchmark(spec, uri, files)
    if layout == "webdataset":  # resolve refuses a make-data split whose write was interrupted
        shards = sorted(_shards(spec, uri), key=lambda shard: _natural_key(shard.name))
        classnames, source, templates = _side_files(spec, uri, _parent(uri))
        return OpenedEvalSet(spec, "webdataset", classnames, templates or DEFAULT_TEMPLATES, source, shards=shards)
    return _open_imagefolder(spec, uri, files)


def _detect_layout(spec: EvalSet, files: list[str], top: set[str]) -> str:
    if "manifest.json" in top:
        return "flexi-jest"
    if any(f.startswith(f"{spec.split}/") and f.endswith(".tar") for f in files):
        return "clip_benchmark"
    if any(f.endswith(".tar") for f in top):
        return "webdataset"
    if any("/" in f and f.lower().endswith(IMAGEFOLDER_EXTENSIONS) for f in files):
        return "imagefolder"
    raise EvalSetError(
        f"eval set {spec.uri!r}: cannot tell its layout: no manifest.json, no {spec.split}/*.tar (CLIP_benchmark), "
        f"no *.tar and no class folders of images ({len(files)} files under it)")


def _open_flexi_jest(spec: EvalSet, uri: str) -> OpenedEvalSet:
    manifest = read_manifest(uri) or {}
    shards = _shards(spec, uri)  # with the manifest's counts and sha256
    classnames, source = manifest.get("classes"), "manifest"
    templates = manifest.get("templates") or ["{}"]
    if spec.classnames:
        classnames, source = read_list_file(spec.classnames, "classnames"), spec.classnames
    if spec.templates:
        templates = read_list_file(spec.templates, "templates")
    return OpenedEvalSet(spec, "flexi-jest", classnames, templates, source if classnames else "none",
                         dataset=manifest.get("dataset"), shards=shards, manifest=manifest)


def _is_retrieval_set(folder: str) -> bool:
    """CLIP_benchmark marks retrieval sets (several captions a sample, one a line) with dataset_type.txt."""
    marker = storage.join(folder, DATASET_TYPE_FILE)
    return storage.exists(marker) and storage.read_bytes(marker).decode().strip().lower() == "retrieval"


def _open_clip_benchmark(spec: EvalSet, uri: str, files: list[str]) -> OpenedEvalSet:
    split_dir = storage.join(uri, spec.split)
    names = sorted((f.split("/", 1)[1] for f in files if f.startswith(f"{spec.split}/") and f.endswith(".tar")
                    and f.count("/") == 1), key=_natural_key)
    if f"{spec.split}/nshards.txt" in files:  # the exporter's count: the shards must all be there
        nshards = read_nshards(spec.uri, storage.join(split_dir, "nshards.txt"))
        expected = [f"{i}.tar" for i in range(nshards)]
        missing = [n for n in expected if n not in names]
        if missing:
            raise EvalSetError(f"eval set {spec.uri!r}: nshards.txt says {nshards} shards; missing "
                               f"{storage.join(split_dir, missing[0])}")
        names = expected
    if not names:
        raise EvalSetError(f"eval set {spec.uri!r}: no .tar shards in {split_dir}")
    classnames, source, templates = _side_files(spec, uri)
    return OpenedEvalSet(spec, "clip_benchmark", classnames, templates or DEFAULT_TEMPLATES, source,
                         shards=[Shard(storage.join(split_dir, n)) for n in names],
                         multi_caption=_is_retrieval_set(uri))


MAX_NSHARDS = 100_000  # far more shards than any eval set has (ImageNet-1k's val set: 50 of 1,000 images)


def read_nshards(set_uri: str, uri: str) -> int:
    """CLIP_benchmark's nshards.txt: a positive integer (ASCII digits), at most MAX_NSHARDS; else an EvalSetError
    naming the file and the set."""
    raw = storage.read_bytes(uri)
    text = raw.strip()
    nshards = int(text) if re.fullmatch(rb"[0-9]{1,12}", text) else None
    if nshards is None or not 1 <= nshards <= MAX_NSHARDS:
        raise EvalSetError(f"eval set {set_uri!r}: {uri} must hold a positive shard count of at most {MAX_NSHARDS}, "
                           f"got {raw[:40]!r}")
    return nshards


def _open_imagefolder(spec: EvalSet, uri: str, files: list[str]) -> OpenedEvalSet:
    images = [f for f in files if "/" in f and f.lower().endswith(IMAGEFOLDER_EXTENSIONS)]
    folders = sorted({f.split("/", 1)[0] for f in images})
    if not folders:
        raise EvalSetError(f"eval set {spec.uri!r}: no class folders of images ({', '.join(IMAGEFOLDER_EXTENSIONS)})")
    index = {name: i for i, name in enumerate(folders)}
    classnames, source, templates = _side_files(spec, uri)
    if classnames is None:
        classnames, source = folders, "folder names"
    elif len(classnames) != len(folders):
        raise EvalSetError(f"eval set {spec.uri!r}: {len(classnames)} class names ({source}) for {len(folders)} "
                           "class folders holding images; one name a folder, in sorted folder order")
    paths = [(f, index[f.split("/", 1)[0]]) for f in images]
    return OpenedEvalSet(spec, "imagefolder", classnames, templates or DEFAULT_TEMPLATES, source, image_paths=paths)


# ---- names
# ------------------------------------------------------------------------------------------------------------


def _sanitize(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    return name if re.match(EVAL_SET_NAME, name) else f"set-{name}".rstrip("-")


def _path_parts(uri: str) -> list[str]:
    """The folders of a set's URI, innermost last; a shard file or pattern is dropped for its folder."""
    path = re.sub(r"^[a-z][a-z0-9+.-]*://", "", uri.split("::")[0]).rstrip("/")
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    if parts and ("{" in parts[-1] or parts[-1].endswith(".tar")):
        parts = parts[:-1]
    return parts or ["eval"]


def assign_names(sets: list[OpenedEvalSet]) -> list[str]:
    """The name each set is reported under: its own, else derived from its path and unique in the call.

    Unnamed: a flexi-jest split's dataset (e.g. 'shapes'), else its folder's name ('<parent>-<folder>' for a
    folder called test, val, eval...); taken already, more of the path in front ('a-eval', 'runs-a-eval'), then
    a number. Sets named by the user keep their names; two sets with one name are an error."""
    given = [s.spec.name for s in sets if s.spec.name]
    repeated = sorted({n for n in given if given.count(n) > 1})
    if repeated:
        raise EvalSetError(f"eval set names must be unique; repeated: {repeated}")
    taken = set(given)
    names = []
    for s in sets:
        if s.spec.name:
            names.append(s.spec.name)
            continue
        parts = _path_parts(s.uri)
        first = len(parts) - (2 if parts[-1].lower() in GENERIC_FOLDER_NAMES and len(parts) > 1 else 1)
        candidates = ([s.dataset] if s.dataset else []) + [_sanitize("-".join(parts[i:])) for i in range(first, -1, -1)]
        name = next((c for c in candidates if c not in taken), None)
        number = 2
        while name is None:
            name = f"{candidates[-1]}-{number}" if f"{candidates[-1]}-{number}" not in taken else None
            number += 1
        taken.add(name)
        names.append(name)
    return names
