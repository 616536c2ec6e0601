"""Model files and training checkpoints, written atomically through flexi_jest.storage.

model file  (model.pt):           {"model_config": {...}, "state_dict": {...}}; its sha256 identifies the model.
                                  The state_dict has open_clip's keys (DualEncoder.clip), so open_clip's
                                  load_checkpoint reads a model file as it is.
checkpoint  (checkpoints/step-N.pt): model, optimiser, scheduler, step, RNG states, data position, FLOP ledger
`checkpoints/latest.json` names the newest complete checkpoint; it is written after the checkpoint itself.
"""

import io
import json
from typing import Any

import torch

from flexi_jest import storage
from flexi_jest.config import ModelConfig
from flexi_jest.models import DualEncoder

LATEST = "latest.json"


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def model_bytes(model: DualEncoder) -> bytes:
    """The model file's bytes."""
    return _to_bytes(model_state(model))


def save_model(model: DualEncoder, uri: str) -> str:
    """Write the model file; returns its sha256."""
    data = model_bytes(model)
    storage.write_bytes(uri, data)
    return storage.sha256_bytes(data)


def load_model(uri: str, device: torch.device | str = "cpu") -> tuple[DualEncoder, str]:
    """(model, sha256) from a model file (or a training checkpoint, which holds one)."""
    data = storage.read_bytes(uri)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{uri} is not a readable flexi-jest model file: {exc}") from exc
    if "model" in payload and "state_dict" not in payload:  # a training checkpoint
        payload = payload["model"]
    model = DualEncoder(ModelConfig.model_validate(payload["model_config"]))
    model.clip.load_state_dict(payload["state_dict"])
    return model.to(device), storage.sha256_bytes(data)


def save_checkpoint(out_dir: str, step: int, state: dict[str, Any], keep: int = 2) -> str:
    """Write checkpoints/step-<step>.pt, then point latest.json at it; older ones beyond `keep` are removed."""
    directory = storage.join(out_dir, "checkpoints")
    name = f"step-{step:08d}.pt"
    storage.write_bytes(storage.join(directory, name), _to_bytes(state))
    storage.write_bytes(storage.join(directory, LATEST), json.dumps({"step": step, "file": name}).encode())
    for old in storage.list_names(directory, ".pt")[:-keep]:
        storage.remove(storage.join(directory, old))
    return storage.join(directory, name)


def load_latest_checkpoint(out_dir: str) -> dict[str, Any] | None:
    """The newest complete checkpoint under out_dir, or None if there is none."""
    directory = storage.join(out_dir, "checkpoints")
    pointer = storage.join(directory, LATEST)
    if not storage.exists(pointer):
        return None
    latest = json.loads(storage.read_bytes(pointer))
    data = storage.read_bytes(storage.join(directory, latest["file"]))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def model_state(model: DualEncoder) -> dict[str, Any]:
    """What a model file holds: the model config and CPU weights (open_clip's keys)."""
    return {"model_config": model.cfg.model_dump(mode="json"),
            "state_dict": {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}}
