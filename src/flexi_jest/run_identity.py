"""Which config a training out_dir belongs to: a stage never resumes, or returns, another config's work.

A training run writes `run_config.json` into its out_dir when it starts: the config without its runtime-only
fields (RUNTIME_FIELDS: where and how verbosely it runs, not what it computes) and that content's sha256.
A later run on the same out_dir then

- refuses if the out_dir holds a checkpoint or a result from a *different* config, naming the fields that
  differ (StaleOutputError; the data is left as it was);
- with the same config: returns a finished run's result without recomputing (and says so), or resumes from
  the latest checkpoint (`resume`);
- with `overwrite`: removes the earlier run's files and starts afresh.
"""

import hashlib
import json
from typing import Any

from pydantic import BaseModel

from flexi_jest import storage
from flexi_jest.errors import BadInput

RUN_CONFIG = "run_config.json"
# fields that change where or how a run executes, not what it computes
RUNTIME_FIELDS = frozenset({"out_dir", "device", "progress", "log_every", "resume", "processes", "overwrite",
                            "checkpoint_every", "compile"})
OUTPUT_FILES = ("result.json", "model.pt", "metrics.jsonl", RUN_CONFIG)


class StaleOutputError(RuntimeError, BadInput):
    """out_dir holds a checkpoint or result of another config."""


def content_config(cfg: BaseModel) -> dict[str, Any]:
    """The config's fields that decide what the run computes (RUNTIME_FIELDS left out)."""
    return {key: value for key, value in cfg.model_dump(mode="json").items() if key not in RUNTIME_FIELDS}


def config_sha256(content: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def differing_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ: {"optim": {"lr": 1}} vs {"optim": {"lr": 2}} -> ["optim.lr"]."""
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += differing_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'filter_ratio: 0.8 -> 0.5; model.vision_width: 96 -> 48' (nested values looked up by their dotted names)."""
    def lookup(values: dict[str, Any], name: str) -> Any:
        for part in name.split("."):
            values = values.get(part, "(absent)") if isinstance(values, dict) else "(absent)"
        return values
    return "; ".join(f"{name}: {lookup(old, name)!r} -> {lookup(new, name)!r}" for name in differing_fields(old, new))


def recorded_config(out_dir: str, checkpoint_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The content config the out_dir's earlier run recorded (run_config.json, else its checkpoint's config)."""
    path = storage.join(out_dir, RUN_CONFIG)
    if storage.exists(path):
        return json.loads(storage.read_bytes(path))["config"]
    if checkpoint_config is not None:  # through JSON, as run_config.json holds it (tuples become lists)
        return {key: value for key, value in json.loads(json.dumps(checkpoint_config)).items()
                if key not in RUNTIME_FIELDS}
    return None


def has_earlier_run(out_dir: str) -> bool:
    return any(storage.exists(storage.join(out_dir, name)) for name in ("result.json", RUN_CONFIG,
                                                                         "checkpoints/latest.json"))


def check_out_dir(cfg: BaseModel, checkpoint_config: dict[str, Any] | None = None, remove: bool = True) -> str:
    """Before a training run on cfg.out_dir: 'fresh' (nothing there, or removed by overwrite), 'finished' (a
    result of this very config is there), or 'resume' (a checkpoint of this config); StaleOutputError if what
    is there belongs to another config. checkpoint_config: the config stored in the latest checkpoint, if any;
    remove: whether this process removes an earlier run under overwrite (one rank of several does)."""
    out_dir = cfg.out_dir
    if getattr(cfg, "overwrite", False):
        if remove:
            remove_earlier_run(out_dir)
        return "fresh"
    if not has_earlier_run(out_dir):
        return "fresh"
    new = content_config(cfg)
    old = recorded_config(out_dir, checkpoint_config)
    if old is None:
        raise StaleOutputError(f"{out_dir} holds a result of an unknown config (no {RUN_CONFIG}): use another "
                               "out_dir, or overwrite (--overwrite / overwrite: true) to start afresh")
    if config_sha256(old) != config_sha256(new):
        raise StaleOutputError(
            f"{out_dir} holds a checkpoint or result of a different config ({describe_difference(old, new)}): "
                               "use another out_dir, or overwrite (--overwrite / overwrite: true) to start afresh")
    if storage.exists(storage.join(out_dir, "result.json")) and storage.exists(storage.join(out_dir, "model.pt")):
        return "finished"
    return "resume"


def write_run_config(cfg: BaseModel) -> None:
    content = content_config(cfg)
    storage.write_bytes(storage.join(cfg.out_dir, RUN_CONFIG),
                        json.dumps({"sha256": config_sha256(content), "config": content}, indent=1).encode())


def remove_earlier_run(out_dir: str) -> None:
    """Remove an earlier run's files from out_dir (its checkpoints, result, model, history, run config)."""
    checkpoints = storage.join(out_dir, "checkpoints")
    for name in storage.list_names(checkpoints) if storage.exists(storage.join(checkpoints, "latest.json")) else []:
        storage.remove(storage.join(checkpoints, name))
    for name in OUTPUT_FILES:
        if storage.exists(storage.join(out_dir, name)):
            storage.remove(storage.join(out_dir, name))
