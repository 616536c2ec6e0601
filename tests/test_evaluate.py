import pytest
import torch
import torch.nn.functional as F

from flexi_jest.config import EvaluateConfig
from flexi_jest.evaluate import classification_accuracy, evaluate, retrieval_recall


def test_classification_accuracy_counts_top_k():
    classifier = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.5, 0.9, 0.0], [0.9, 0.0, 0.8]])
    labels = torch.tensor([0, 2, 0, 2])
    acc = classification_accuracy(images, labels, classifier, ks=(1, 2))
    assert acc["top1"] == pytest.approx(0.5)  # rows 0 and 1 right
    assert acc["top2"] == pytest.approx(1.0)


def test_retrieval_recall_perfect_and_shuffled():
    emb = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    captions = [f"caption {i}" for i in range(20)]
    perfect = retrieval_recall(emb, emb, captions)
    assert perfect["image_to_text_r1"] == perfect["text_to_image_r1"] == 1.0
    wrong = retrieval_recall(emb, emb.roll(1, dims=0), captions, ks=(1,))
    assert wrong["image_to_text_r1"] == 0.0


def test_retrieval_counts_a_duplicate_caption_as_a_hit():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped...
    # ...but identical captions
    assert retrieval_recall(image, text, ["same", "same"], ks=(1,))["image_to_text_r1"] == 1.0
    assert retrieval_recall(image, text, ["a", "b"], ks=(1,))["image_to_text_r1"] == 0.0


def test_trained_reference_beats_chance_on_eval(reference, shapes_data, tmp_path):
    result = evaluate(EvaluateConfig(model=reference.checkpoint, eval_data=[shapes_data.splits["eval"].path],
                                     out_path=str(tmp_path / "eval.json")))
    metrics = result.splits["shapes"]
    assert metrics.num_samples == 200 and metrics.num_classes == 48
    assert 0.0 <= metrics.top1 <= metrics.top5 <= 1.0
    assert metrics.image_to_text_r1 <= metrics.image_to_text_r5 <= metrics.image_to_text_r10
    assert (tmp_path / "eval.json").exists()
