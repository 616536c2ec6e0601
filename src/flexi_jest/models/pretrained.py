"""Start a model from an open_clip checkpoint: a file (local or s3://) in the format
`open_clip.create_model(name, pretrained=path)` reads (a state_dict, or a dict holding one under
"state_dict", as flexi-jest's own model files do), or a pretrained tag of the named model that the local
cache already holds (no downloads at run time).

The weights load through open_clip's load_checkpoint (weights_only; its conversions of older formats
apply). A checkpoint that does not fit the architecture fails first, naming the mismatching keys and
shapes. The checkpoint's patch size is the base of the flexible image tower: other patch sizes (Flexi
scoring, training at [16, 32]) are resampled from it at every call (flexivit.py).
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import open_clip
from open_clip.factory import load_checkpoint, load_state_dict
from torch import nn

from flexi_jest import storage
from flexi_jest.models.dual_encoder import DualEncoder

MAX_NAMED = 5  # mismatching keys named in an error
# open_clip's default weight file names on the HF hub (open_clip.pretrained.HF_WEIGHTS_NAME and its safetensors twin)
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class CheckpointMismatch(ValueError):
    """The checkpoint's weights do not fit the configured architecture."""


def cached_pretrained_file(name: str | None, tag: str, cache_dir: str | None = None) -> str | None:
    """The local file of open_clip pretrained tag `tag` of model `name`, if the cache holds it; None when
    `tag` is no pretrained tag of `name`. Raises FileNotFoundError for a known tag not in the cache."""
    cfg = open_clip.get_pretrained_cfg(name, tag) if name else {}
    if not cfg:
        return None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)  # "org/repo/file" or "org/repo/" (open_clip's default file)
        for candidate in ([filename] if filename else list(HUB_FILES)):
            found = try_to_load_from_cache(repo, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        found = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg["url"])
        if found.is_file():
            return str(found)
    raise FileNotFoundError(
        f"pretrained tag {tag!r} of {name} is not in the local open_clip / Hugging Face cache, and flexi-jest "
        f"downloads nothing at run time: fetch it once where there is network, e.g. "
        f"open_clip.create_model({name!r}, pretrained={tag!r}), or give a checkpoint file")


@contextmanager
def local_checkpoint(source: str, name: str | None) -> Iterator[str]:
    """A local file for source: the file itself, a temporary copy of an s3:// object, or a cached tag."""
    if storage.is_s3(source):
        data = storage.read_bytes(source)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / (Path(source).name or "checkpoint.pt")
            path.write_bytes(data)
            yield str(path)
        return
    if Path(source).is_file():
        yield source
        return
    cached = cached_pretrained_file(name, source)
    if cached is None:
        tags = open_clip.list_pretrained_tags_by_model(name) if name else []
        raise FileNotFoundError(f"init checkpoint {source!r} is neither a file nor a pretrained tag of "
                                f"{name or 'a project model (no open_clip name)'}" + (
                                    f" (tags: {tags})" if tags else ""))
    yield cached


def mismatches(model: nn.Module, state_dict: dict) -> list[str]:
    """The checkpoint's differences from model: missing and unexpected keys, shapes that differ. A missing
    logit_bias is no mismatch (open_clip starts a CLIP checkpoint's SigLIP bias at 0)."""
    expected = model.state_dict()
    found = []
    for key, value in expected.items():
        if key not in state_dict:
            if key != "logit_bias":
                found.append(f"missing {key} {tuple(value.shape)}")
        elif tuple(state_dict[key].shape) != tuple(value.shape) and key not in ("logit_scale", "logit_bias"):
            found.append(f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(value.shape)}")
    found += [f"unexpected {key} {tuple(state_dict[key].shape)}" for key in state_dict if key not in expected]
    return found


def load_pretrained(model: DualEncoder, source: str) -> None:
    """Load the open_clip checkpoint `source` (file, s3:// URI or cached pretrained tag) into model, in place."""
    with local_checkpoint(source, model.cfg.name) as path:
        try:
            state_dict = load_state_dict(path, weights_only=True)
        except Exception as exc:
            raise ValueError(f"init checkpoint {source} is not a readable open_clip checkpoint: {exc}") from exc
        problems = mismatches(model.clip, state_dict)
        if problems:
            raise CheckpointMismatch(
                f"init checkpoint {source} does not fit model {model.cfg.name or model.cfg.model_dump()}: "
                f"{len(problems)} mismatches, first: " + "; ".join(problems[:MAX_NAMED]))
        load_checkpoint(model.clip, path, strict=True, weights_only=True)
