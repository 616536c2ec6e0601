"""Model files and training checkpoints, written atomically through flexi_jest.storage.

model file  (model.pt):           {"model_config": {...}, "state_dict": {...}}; its sha256 identifies the model.
                                  The state_dict has open_clip's keys (DualEncoder.clip), so open_clip's
                                  load_checkpoint reads a model file as it is.
checkpoint  (checkpoints/step-N.pt): model, optimiser, scheduler, step, RNG states, data position, FLOP ledger
`checkpoints/latest.json` names the newest complete checkpoint; it is written after the checkpoint itself.

Checkpoints and model files are data, never code: they hold only tensors and plain Python values (dicts,
lists, tuples, numbers, strings) and are read with `torch.load(weights_only=True)`, so a planted pickle
cannot run. The name in latest.json must be a file inside checkpoints/ (storage.confined).
"""

import io
import json
import random
from typing import Any

import numpy as np
import torch

from flexi_jest import storage
from flexi_jest.config import ModelConfig
from flexi_jest.errors import BadInput
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


class ModelFileError(ValueError, BadInput):
    """A model file that is not one: unreadable bytes, a pickle torch refuses, or a payload of the wrong shape
    (not {"model_config": {...}, "state_dict": {name: tensor}}, or weights that do not fit the config)."""


def load_model(uri: str, device: torch.device | str = "cpu") -> tuple[DualEncoder, str]:
    """(model, sha256) from a model file (or a training checkpoint, which holds one); anything else is a
    ModelFileError naming the file and what is wrong with it."""
    data = storage.read_bytes(uri)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{uri} is not a readable flexi-jest model file: {exc}") from exc
    if isinstance(payload, dict) and "model" in payload and "state_dict" not in payload:  # a training checkpoint
        payload = payload["model"]
    return _model_from_payload(uri, payload).to(device), storage.sha256_bytes(data)


def _model_from_payload(uri: str, payload: Any) -> DualEncoder:
    """The DualEncoder a model file's payload describes; a ModelFileError saying what is missing or wrong."""
    def refuse(why: str) -> ModelFileError:
        return ModelFileError(f"{uri} is not a readable flexi-jest model file: {why}")

    if not isinstance(payload, dict):
        raise refuse(f"it holds a {type(payload).__name__}, not a dict with model_config and state_dict")
    missing = [key for key in ("model_config", "state_dict") if key not in payload]
    if missing:
        raise refuse(f"no {' and no '.join(missing)} (it has {sorted(map(str, payload))[:10]})")
    config, weights = payload["model_config"], payload["state_dict"]
    if not isinstance(config, dict):
        raise refuse(f"model_config is a {type(config).__name__}, not a dict of model fields")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise refuse("state_dict is not a dict of parameter names to tensors")
    try:
        model = DualEncoder(ModelConfig.model_validate(config))
    except (ValueError, TypeError) as exc:  # pydantic.ValidationError is a ValueError
        raise refuse(f"its model_config is not a valid model: {' '.join(str(exc).split())[:500]}") from exc
    try:
        model.clip.load_state_dict(weights)
    except RuntimeError as exc:  # missing or unexpected keys, wrong shapes
        raise refuse(f"its state_dict does not fit its model_config: {' '.join(str(exc).split())[:500]}") from exc
    return model


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
    """The newest complete checkpoint under out_dir, or None if there is none.

    latest.json must name a file inside checkpoints/; the checkpoint is read weights-only (tensors and plain
    values): anything else is a ValueError naming the file, and nothing in it is executed."""
    directory = storage.join(out_dir, "checkpoints")
    pointer = storage.join(directory, LATEST)
    if not storage.exists(pointer):
        return None
    try:
        latest = json.loads(storage.read_bytes(pointer))
        name = latest["file"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{pointer} is not a checkpoint pointer ({{\"step\": N, \"file\": name}}): {exc!r}") from exc
    uri = storage.confined(directory, name, pointer)
    data = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what it refuses
        raise ValueError(f"{uri} is not a weights-only flexi-jest checkpoint (tensors and plain values); refusing to "
                         f"load it: {exc}") from exc


def remove_orphaned_temp_files(out_dir: str) -> list[str]:
    """Remove what an interrupted atomic write left in a run's directory and its checkpoints/ (kill -9 during a
    checkpoint); called at the start of a run, before anything is written. Returns the removed names."""
    return [*storage.remove_temp_files(out_dir), *storage.remove_temp_files(storage.join(out_dir, "checkpoints"))]


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a training step may draw from, as tensors and plain values (weights-only loadable):
    the step's generator, torch's CPU (and CUDA) generators, Python's `random` and NumPy's global state."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next): plain values
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    """Set what rng_states recorded (a checkpoint from before NumPy/CUDA states were kept restores the rest)."""
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in states:
        numpy_state = states["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                             numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))


def model_state(model: DualEncoder) -> dict[str, Any]:
    """What a model file holds: the model config and CPU weights (open_clip's keys)."""
    return {"model_config": model.cfg.model_dump(mode="json"),
            "state_dict": {k: v.detach().cpu() for k, v in model.clip.state_dict().items()}}
