"""Export a trained model as an open_clip checkpoint: a folder that open_clip loads without flexi-jest.

    <dir>/open_clip_config.json         {"model_cfg": <open_clip model config>,
                                         "preprocess_cfg": {mean, std, size, ...}}
    <dir>/open_clip_pytorch_model.bin   the open_clip state_dict (tensors only: torch.load(weights_only=True) reads it)
    <dir>/tokenizer.json ...            a Hugging Face tokenizer's files, for a model that has one (ViT-B-16-SigLIP):
                                        open_clip.get_tokenizer("local-dir:<dir>") reads them from the folder

Load it with `open_clip.create_model_and_transforms("local-dir:<dir>")`, or for a named model with
`open_clip.create_model_and_transforms(name, pretrained="<dir>/open_clip_pytorch_model.bin")`. The model is
open_clip's at the base patch size; other patch sizes need flexi_jest.models (FlexiViT resampling).
"""

import io
import json

import torch

from flexi_jest import storage
from flexi_jest.models import DualEncoder, Tokenizer
from flexi_jest.models.configs import open_clip_config, preprocess_config

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"


def open_clip_files(model: DualEncoder) -> dict[str, bytes]:
    """{file name: bytes} of the export: the config JSON, the weights, a Hugging Face tokenizer's files."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.clip.state_dict().items()}, buffer)
    config = {"model_cfg": open_clip_config(model.cfg), "preprocess_cfg": preprocess_config(model.cfg),
              "flexi_jest": {"model_config": model.cfg.model_dump(mode="json")}}
    return {CONFIG_FILE: json.dumps(config, indent=1).encode(), WEIGHTS_FILE: buffer.getvalue(),
            **Tokenizer(model.cfg).hugging_face_files()}


def export_open_clip(model: DualEncoder, out_dir: str) -> str:
    """Write the open_clip export of model under out_dir (a path or s3:// URI); returns the weights' URI."""
    for name, data in open_clip_files(model).items():
        storage.write_bytes(storage.join(out_dir, name), data)
    return storage.join(out_dir, WEIGHTS_FILE)


