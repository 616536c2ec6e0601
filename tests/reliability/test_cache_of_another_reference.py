"""Fault: the learner is handed a reference cache made by another reference than the reference stage's output.
The learner's expected reference sha256 comes from the reference artifact, never from the cache's own manifest,
so the task fails naming both sha256s."""

import json

import pytest

from conftest import TEST_MODEL
from flexi_jest import storage
from flexi_jest.checkpoint import save_model
from flexi_jest.models import DualEncoder
from flexi_jest.pipeline_support import learner_reference
from flexi_jest.reference_cache import CacheError


@pytest.fixture(scope="module")
def other_reference(tmp_path_factory):
    """A model file that is not the reference the cache was made with: (path, sha256)."""
    path = tmp_path_factory.mktemp("other") / "model.pt"
    sha = save_model(DualEncoder(TEST_MODEL), str(path))
    return str(path), sha


def test_the_learners_reference_sha_comes_from_the_reference_artifact(reference, reference_cache):
    values = learner_reference(reference_cache.cache_dir, {"uri": reference.checkpoint,
                                                           "sha256": reference.checkpoint_sha256})
    assert values["reference_sha256"] == reference.checkpoint_sha256
    assert values["reference_training_flops"] == reference.flops.reference_training > 0
    assert values["reference_caching_flops"] > 0
    # an imported model (no sha256 in its metadata): the file's own sha256
    assert learner_reference(reference_cache.cache_dir, {"uri": reference.checkpoint}) == values


@pytest.mark.parametrize("with_sha", [True, False])
def test_a_cache_of_another_reference_fails_naming_both(reference, reference_cache, other_reference, with_sha):
    path, sha = other_reference
    with pytest.raises(CacheError) as error:
        learner_reference(reference_cache.cache_dir, {"uri": path, **({"sha256": sha} if with_sha else {})})
    assert sha in str(error.value) and reference.checkpoint_sha256 in str(error.value)


@pytest.mark.slow  # reason: a KFP local run of the learner task (13 s on 2 cores); the check it reaches,
# learner_reference on another reference's cache, is tested above in the default suite
def test_the_pipelines_learner_task_fails_on_a_cache_of_another_reference(shapes_data, reference_cache, other_reference,
                                                                         tmp_path, monkeypatch, capfd):
    """The train_learner component under KFP local execution, on imported artifacts: pool, eval split and the
    cache of the session's reference, but another reference model."""
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model

    from components.stages import train_learner

    path, sha = other_reference
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))

    def imported(uri: str, kind):
        return dsl.importer(artifact_uri=uri, artifact_class=kind, metadata={"uri": uri}).output

    @dsl.pipeline(name="learner-with-another-reference")
    def learner_alone():
        train_learner(config_json=json.dumps({"model": TEST_MODEL.model_dump(), "super_batch_size": 40,
                                              "progress": False}),
                      profile="tiny", method="joint", score="learnability", filter_ratio=0.8, n_chunks=4, steps=1,
                      storage_root="", experiment="another-reference",
                      pool=imported(shapes_data.splits["pool"].path, Dataset),
                      cache=imported(reference_cache.cache_dir, Dataset),
                      eval_split=imported(shapes_data.splits["eval"].path, Dataset),
                      reference=imported(path, Model))

    capfd.readouterr()
    with pytest.raises(RuntimeError):
        learner_alone()
    output = "".join(capfd.readouterr())
    assert "CacheError" in output and sha in output and storage.sha256_file(path) == sha
    assert reference_cache.reference_sha256 in output
