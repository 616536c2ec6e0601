"""Two processes on the CPU (torchrun, gloo) against one: distributed selection, the cross-rank sigmoid loss
and its gradients, DDP training of the reference and the learner, and checkpoints across world sizes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TEST_MODEL
from flexi_jest.checkpoint import load_model
from flexi_jest.config import TrainLearnerConfig, TrainReferenceConfig
from flexi_jest.distributed import World, check_divisible, shard
from flexi_jest.losses import multi_patch_loss, patch_groups, sigmoid_loss
from flexi_jest.selection import joint_select_from_embeddings
from flexi_jest.train import train_learner, train_reference

WORKER = Path(__file__).parent / "distributed_worker.py"


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Two local processes under torchrun (a free port is picked by --standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=cwd)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_case(case: str, inputs: dict, tmp_path: Path) -> list[dict]:
    torch.save(inputs, tmp_path / "inputs.pt")
    torchrun([str(WORKER), case, str(tmp_path / "inputs.pt"), str(tmp_path)], tmp_path)
    outputs = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [o["world_size"] for o in outputs] == [2, 2]
    return outputs


def unit_rows(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)


# ---- pure pieces ---------------------------------------------------------------------------------------------


def test_shards_cover_the_batch_and_odd_sizes_are_refused_by_name():
    world = World(rank=1, size=4)
    assert shard(12, world) == slice(3, 6)
    assert [shard(12, World(r, 4)) for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    with pytest.raises(ValueError, match="super_batch_size = 10 is not divisible by the number of processes \\(4\\)"):
        check_divisible("super_batch_size", 10, world)


def test_patch_groups_split_a_mixed_batch_by_global_position():
    # a batch of 8 at patch sizes [8, 16]: rows 0-3 at 8, rows 4-7 at 16
    assert patch_groups(8, [8, 16], slice(0, 8)) == [4, 4]
    assert patch_groups(8, [8, 16], slice(0, 4)) == [4, 0]
    assert patch_groups(8, [8, 16], slice(2, 6)) == [2, 2]
    assert patch_groups(6, [8, 16, 32], slice(3, 6)) == [0, 1, 2]


# ---- two processes -------------------------------------------------------------------------------------------


def test_global_selection_equals_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    B, d = 64, 16
    inputs = {"learner": (unit_rows(B, d, g), unit_rows(B, d, g), torch.tensor(2.3), torch.tensor(-10.0)),
              "reference": (unit_rows(B, d, g), unit_rows(B, d, g), torch.tensor(2.3), torch.tensor(-10.0)),
              "seed": 7, "n_select": 13, "n_chunks": 4}
    outputs = run_case("selection", inputs, tmp_path)
    expected = joint_select_from_embeddings("learnability", inputs["learner"], inputs["reference"], 13, 4,
                                            torch.Generator().manual_seed(7))
    for out in outputs:
        assert torch.equal(out["chosen"], expected)
        assert out["digest"] == "sha-of-rank-0"  # broadcast_object: rank 0's value on every rank


@pytest.mark.parametrize("chunk", [None, pytest.param(2, marks=pytest.mark.slow)])  # reason (slow): the chunked
# loss on two processes again (12 s on 2 cores); test_losses checks chunked = unchunked in one process
def test_cross_rank_loss_and_gradients_equal_one_process(tmp_path, chunk):
    g = torch.Generator().manual_seed(1)
    B, d = 12, 8
    inputs = {"image": unit_rows(B, d, g), "text": unit_rows(B, d, g), "scale": torch.tensor(2.0),
              "bias": torch.tensor(-3.0), "chunk": chunk}
    outputs = run_case("loss", inputs, tmp_path)

    image, text = inputs["image"].clone().requires_grad_(), inputs["text"].clone().requires_grad_()
    scale, bias = inputs["scale"].clone().requires_grad_(), inputs["bias"].clone().requires_grad_()
    full = sigmoid_loss(image, text, scale, bias)
    full.backward()
    assert torch.allclose(sum(o["share"] for o in outputs), full, atol=1e-5)
    assert torch.allclose(torch.cat([o["image_grad"] for o in outputs]), image.grad, atol=1e-6)
    # via the gather's backward
    assert torch.allclose(torch.cat([o["text_grad"] for o in outputs]), text.grad, atol=1e-6)
    assert torch.allclose(sum(o["scale_grad"] for o in outputs), scale.grad, atol=1e-5)
    assert torch.allclose(sum(o["bias_grad"] for o in outputs), bias.grad, atol=1e-6)


@pytest.mark.slow  # reason: a mixed-patch step on two gloo processes (19 s on 2 cores); the cross-rank loss and
# gradient checks of one patch size stay in the default suite
def test_ddp_gradients_of_a_mixed_patch_step_equal_one_process(tmp_path):
    from flexi_jest.models import DualEncoder, Tokenizer
    torch.manual_seed(0)
    model = DualEncoder(TEST_MODEL)
    images = torch.randn(8, 3, 32, 32)
    tokens = Tokenizer(TEST_MODEL)([f"a {c} shape number {i}" for i, c in enumerate("rgbyrgby")])
    inputs = {"model_config": TEST_MODEL, "state_dict": model.state_dict(), "images": images, "tokens": tokens,
              "patch_sizes": [8, 16]}
    outputs = run_case("ddp_step", inputs, tmp_path)

    loss = multi_patch_loss(model, images, tokens, [8, 16])
    loss.backward()
    assert torch.allclose(sum(o["share"] for o in outputs), loss.detach(), atol=1e-5)
    for name, parameter in model.named_parameters():
        for out in outputs:  # DDP leaves the same, full gradient on every rank
            assert torch.allclose(out["grads"][name], parameter.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.slow  # reason: a learner on two gloo processes (14 s on 2 cores)
def test_two_processes_decode_each_sample_once_and_hold_only_their_share(tmp_path):
    """Each rank decodes its rows of the super-batch (uint8, never the whole batch); the selected sub-batch's rows
    reach the rank that trains on them; together the ranks see exactly one process's super-batch."""
    from PIL import Image

    from flexi_jest.data.loader import StreamLoader
    from flexi_jest.data.sample import Sample
    from flexi_jest.data.shards import write_split
    pool = str(tmp_path / "pool")
    write_split(iter([Sample(f"s-{i:03d}", Image.new("RGB", (8, 8), (i, 2 * i % 256, 3)), f"caption {i}")
                      for i in range(96)]), pool, samples_per_shard=12)
    batch, steps = 16, 3  # 48 of the 96 samples: within the first epoch, so no sample repeats
    g = torch.Generator().manual_seed(0)
    chosen = [torch.randperm(batch, generator=g)[:4] for _ in range(steps)]  # the same selection on every rank
    outputs = run_case("stream_share", {"pool": pool, "batch": batch, "workers": 0, "chosen": chosen}, tmp_path)
    with StreamLoader(pool, batch, streams=4, mode="epoch", seed=5, image_size=8) as one:
        whole = [one.next_batch() for _ in range(steps)]
    for step in range(steps):
        rank_keys = [o["keys"][step] for o in outputs]
        assert rank_keys[0] + rank_keys[1] == [s["key"] for s in whole[step]]  # one process's super-batch
        assert not set(rank_keys[0]) & set(rank_keys[1])  # decoded once, on one rank
        images = torch.stack([s["image"] for s in whole[step]])
        for rank, out in enumerate(outputs):
            assert out["held"][step] == (torch.Size([batch // 2, 3, 8, 8]), torch.uint8)
            assert torch.equal(out["received"][step], images[chosen[step]][rank * 2:(rank + 1) * 2])
    # what each rank decoded: its own rows (and the read-ahead of its own streams), never the other rank's
    decoded = [o["decoded"] for o in outputs]
    assert not set(decoded[0]) & set(decoded[1]) and all(len(set(d)) == len(d) for d in decoded)
    for rank, out in enumerate(outputs):
        assert set(k for keys in out["keys"] for k in keys) <= set(decoded[rank])


def write_config(path: Path, cfg) -> Path:
    path.write_text(cfg.model_dump_json())
    return path


def assert_same_model(a_path: str, b_path: str, atol: float = 1e-4) -> None:
    """The two models compute the same embeddings. (Weights are not compared one by one: AdamW turns the
    rounding-level gradient of a parameter with no effect, such as an attention key bias, into lr-sized steps.)"""
    from flexi_jest.models import Tokenizer
    a, _ = load_model(a_path)
    b, _ = load_model(b_path)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 32, 32, generator=g)
    tokens = Tokenizer(TEST_MODEL)(["a red circle", "two blue squares", "a small green triangle"])
    with torch.no_grad():
        for patch in (8, 16):
            assert torch.allclose(a.encode_image(images, patch), b.encode_image(images, patch), atol=atol), patch
        assert torch.allclose(a.encode_text(tokens), b.encode_text(tokens), atol=atol)
        assert torch.allclose(a.logit_scale, b.logit_scale,
                              atol=atol) and torch.allclose(a.logit_bias, b.logit_bias, atol=atol)


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # reason: the reference on two gloo processes and on one (23 s on 2 cores)
def test_reference_trains_on_two_processes_like_one(shapes_data, tmp_path):
    cfg = TrainReferenceConfig(data=shapes_data.splits["curated"].path, out_dir=str(tmp_path / "one"), model=TEST_MODEL,
                               steps=3, batch_size=16, progress=False, log_every=1, device="cpu")
    one = train_reference(cfg)
    two_cfg = cfg.model_copy(update={"out_dir": str(tmp_path / "two")})
    torchrun(["-m", "flexi_jest.cli", "train-reference", "--config", str(write_config(tmp_path / "ref.json", two_cfg))],
             tmp_path)
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world_size"] == 2
    assert [h["loss"] for h in history(tmp_path / "two")] == pytest.approx(
        [h["loss"] for h in history(tmp_path / "one")], rel=1e-4)
    assert_same_model(one.checkpoint, str(tmp_path / "two" / "model.pt"))


def learner_cfg(shapes_data, reference_cache, out_dir: Path, **overrides) -> TrainLearnerConfig:
    fields = dict(pool=shapes_data.splits["pool"].path, reference_cache=reference_cache.cache_dir,
                  reference_sha256=reference_cache.reference_sha256, out_dir=str(out_dir), model=TEST_MODEL,
                  method="joint", score="learnability", super_batch_size=40, filter_ratio=0.8, n_chunks=4,
                  scoring_patch_size=16, train_patch_sizes=[8, 16], steps=4, checkpoint_every=2, log_every=1,
                  progress=False, device="cpu")
    return TrainLearnerConfig(**{**fields, **overrides})


def copy_checkpoint(source: Path, target: Path, step: int) -> None:
    """target resumes from source's checkpoint at `step`."""
    (target / "checkpoints").mkdir(parents=True)
    name = f"step-{step:08d}.pt"
    shutil.copy(source / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / "latest.json").write_text(json.dumps({"step": step, "file": name}))


@pytest.mark.slow  # reason: three learner runs on two gloo processes and one, with resumes (47 s on 2 cores)
def test_learner_on_two_processes_matches_one_and_checkpoints_resume_across_world_sizes(
        shapes_data, reference_cache, tmp_path):
    one = train_learner(learner_cfg(shapes_data, reference_cache, tmp_path / "one"))
    torchrun(["-m", "flexi_jest.cli", "train-learner", "--config",
              str(write_config(tmp_path / "two.json", learner_cfg(shapes_data, reference_cache, tmp_path / "two")))],
             tmp_path)
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world_size"] == 2
    one_history, two_history = history(tmp_path / "one"), history(tmp_path / "two")
    # global selection: the same pairs chosen at every step, so the same share of noisy pairs; the same losses
    assert [h["noisy_fraction_selected"] for h in two_history] == [h["noisy_fraction_selected"] for h in one_history]
    assert [h["loss"] for h in two_history] == pytest.approx([h["loss"] for h in one_history], rel=1e-4)
    assert two_history[-1]["total_flops"] == one_history[-1]["total_flops"]
    assert_same_model(one.checkpoint, str(tmp_path / "two" / "model.pt"))

    # a checkpoint written by two processes resumes on one ...
    copy_checkpoint(tmp_path / "two", tmp_path / "two_then_one", step=2)
    resumed = train_learner(learner_cfg(shapes_data, reference_cache, tmp_path / "two_then_one"))
    assert [h["step"] for h in history(tmp_path / "two_then_one")] == [1, 2, 3, 4]
    assert_same_model(one.checkpoint, resumed.checkpoint)
    # ... and one written by one process on two
    copy_checkpoint(tmp_path / "one", tmp_path / "one_then_two", step=2)
    torchrun(["-m", "flexi_jest.cli", "train-learner", "--config", str(write_config(
        tmp_path / "one_then_two.json", learner_cfg(shapes_data, reference_cache, tmp_path / "one_then_two")))],
        tmp_path)
    assert [h["step"] for h in history(tmp_path / "one_then_two")] == [1, 2, 3, 4]
    assert_same_model(one.checkpoint, str(tmp_path / "one_then_two" / "model.pt"))


@pytest.mark.slow  # reason: a learner on two gloo processes (24 s on 2 cores)
def test_local_selection_trains_each_rank_on_picks_from_its_own_shard(shapes_data, reference_cache, tmp_path):
    """Also the way a pipeline stage trains on several devices: `processes: 2` makes the stage start torchrun."""
    cfg = learner_cfg(shapes_data, reference_cache, tmp_path / "local", selection_scope="local", steps=2,
                      train_patch_sizes=[8], processes=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "flexi_jest.cli", "train-learner", "--config",
                           str(write_config(tmp_path / "local.json", cfg))],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["steps"] == 2 and result["world_size"] == 2 and result["flops"]["learner_scoring"] > 0
    steps = history(tmp_path / "local")
    assert len(steps) == 2 and all(0.0 <= h["noisy_fraction_selected"] <= 1.0 for h in steps)


@pytest.mark.slow  # reason: two torchrun processes, one made to fail (26 s on 2 cores)
def test_a_failing_rank_fails_the_stage_with_a_clear_error(shapes_data, reference_cache, tmp_path, capfd):
    from flexi_jest.stages import run_stage
    cfg = learner_cfg(shapes_data, reference_cache, tmp_path / "odd", processes=3)  # a super-batch of 40 over 3 ranks
    with pytest.raises(RuntimeError, match="train-learner on 3 processes failed"):
        run_stage("train-learner", cfg)
    assert "super_batch_size = 40 is not divisible by the number of processes (3)" in capfd.readouterr().err
