import math

import pytest
import torch
import torch.nn.functional as F

from flexi_jest.losses import LOGIT_BIAS_INIT, LOGIT_SCALE_INIT, sigmoid_loss, sigmoid_pair_losses


def embeddings(batch: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    y = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    return x, y


def test_pair_losses_match_the_definition():
    x, y = embeddings(5)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    losses = sigmoid_pair_losses(x, y, scale, bias)
    assert losses.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            logit = 10.0 * float(x[i] @ y[j]) - 10.0
            assert losses[i, j].item() == pytest.approx(-math.log(1 / (1 + math.exp(-z * logit))), rel=1e-5)


def test_paper_initialisation():
    assert math.exp(LOGIT_SCALE_INIT) == pytest.approx(10.0)
    assert LOGIT_BIAS_INIT == -10.0


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 64, 100])
def test_chunked_loss_equals_plain_loss(chunk):
    x, y = embeddings(37, seed=chunk)
    scale, bias = torch.tensor(2.0), torch.tensor(-5.0)
    plain = sigmoid_pair_losses(x, y, scale, bias).sum() / 37
    assert torch.allclose(sigmoid_loss(x, y, scale, bias, chunk_size=chunk), plain, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 10])
def test_chunked_gradients_equal_plain_gradients(chunk):
    x, y = embeddings(23)
    grads = []
    for c in (None, chunk):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        scale, bias = torch.tensor(2.3, requires_grad=True), torch.tensor(-4.0, requires_grad=True)
        sigmoid_loss(xs, ys, scale, bias, chunk_size=c).backward()
        grads.append([xs.grad, ys.grad, scale.grad, bias.grad])
    for plain, chunked in zip(*grads):
        assert torch.allclose(plain, chunked, rtol=1e-4, atol=1e-6)


def test_row_offset_gives_blocks_of_the_full_matrix():
    x, y = embeddings(10)
    scale, bias = torch.tensor(1.0), torch.tensor(-2.0)
    full = sigmoid_pair_losses(x, y, scale, bias)
    assert torch.allclose(sigmoid_pair_losses(x[4:7], y, scale, bias, row_offset=4), full[4:7])


def test_low_precision_embeddings_accumulate_in_fp32():
    x, y = embeddings(8)
    scale, bias = torch.tensor(2.0), torch.tensor(-3.0)
    losses = sigmoid_pair_losses(x.bfloat16(), y.bfloat16(), scale, bias)
    assert losses.dtype == torch.float32
    assert torch.allclose(losses, sigmoid_pair_losses(x, y, scale, bias), atol=5e-2)
