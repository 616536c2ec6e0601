import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flexi_jest.selection import (
    chunk_sizes,
    easy_reference,
    gumbel_top_k,
    hard_learner,
    independent_select,
    joint_select,
    learnability,
    score_matrix,
    select,
    uniform_select,
)


def random_scores(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, batch, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(2, 200), fraction=st.floats(0.01, 1.0), n_chunks=st.integers(1, 20), seed=st.integers(0, 1000))
def test_joint_select_returns_exactly_n_distinct_indices(batch, fraction, n_chunks, seed):
    n_select = max(1, min(batch, int(batch * fraction)))
    chosen = joint_select(random_scores(batch, seed), n_select, n_chunks, torch.Generator().manual_seed(seed))
    assert chosen.dtype == torch.long
    assert chosen.numel() == n_select
    assert chosen.unique().numel() == n_select
    assert 0 <= int(chosen.min()) and int(chosen.max()) < batch


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(2, 100), n_select=st.integers(1, 100), seed=st.integers(0, 100))
def test_independent_and_uniform_counts(batch, n_select, seed):
    n_select = min(n_select, batch)
    scores = random_scores(batch, seed)
    for chosen in (independent_select(scores, n_select, "sample", torch.Generator().manual_seed(seed)),
                   independent_select(scores, n_select, "topk"),
                   uniform_select(batch, n_select, torch.Generator().manual_seed(seed))):
        assert chosen.numel() == n_select == chosen.unique().numel()


def test_chunk_sizes_cover_n_select():
    assert chunk_sizes(10, 4) == [3, 3, 2, 2]
    assert chunk_sizes(3, 16) == [1, 1, 1]
    assert sum(chunk_sizes(1000, 16)) == 1000


def test_joint_select_is_deterministic_for_a_seed():
    scores = random_scores(64)
    a = joint_select(scores, 16, 4, torch.Generator().manual_seed(7))
    b = joint_select(scores, 16, 4, torch.Generator().manual_seed(7))
    c = joint_select(scores, 16, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="n_select"):
        joint_select(random_scores(8), 9)
    with pytest.raises(ValueError, match="square"):
        joint_select(torch.zeros(4, 5), 2)
    with pytest.raises(ValueError, match="n_chunks"):
        joint_select(random_scores(8), 4, n_chunks=0)


def test_low_precision_scores_work():
    scores = random_scores(50).bfloat16()
    chosen = joint_select(scores, 10, 4, torch.Generator().manual_seed(0))
    assert chosen.unique().numel() == 10


def test_joint_selection_finds_a_planted_block_that_independent_selection_misses():
    """A block whose members are individually unremarkable but score highly together."""
    batch, block = 128, 16
    planted = torch.arange(block) * 8  # spread over the batch
    trials, joint_hits, independent_hits = 60, 0.0, 0.0
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        scores = 0.1 * torch.randn(batch, batch, generator=g)
        scores[planted[:, None], planted[None, :]] += 2.0
        scores.diagonal().zero_()  # own scores carry no signal
        joint = joint_select(scores, block, n_chunks=8, generator=g)
        independent = independent_select(scores, block, "sample", g)
        joint_hits += torch.isin(joint, planted).float().mean().item()
        independent_hits += torch.isin(independent, planted).float().mean().item()
    joint_rate, independent_rate = joint_hits / trials, independent_hits / trials
    assert independent_rate < 0.25  # near the base rate 16/128
    assert joint_rate > 0.5  # measured 0.67: chunks stay near-uniform until one hits the block
    assert joint_rate > 3 * independent_rate


def test_zero_off_diagonal_makes_joint_equal_independent_in_distribution():
    """With no interactions the conditional score is the own score: inclusion frequencies must agree."""
    batch, n_select, trials = 12, 4, 4000
    own = torch.linspace(-2.0, 2.0, batch)
    scores = torch.diag(own)
    joint_counts = torch.zeros(batch)
    independent_counts = torch.zeros(batch)
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        joint_counts[joint_select(scores, n_select, n_chunks=4, generator=g)] += 1
        independent_counts[independent_select(scores, n_select, "sample", g)] += 1
    joint_freq, independent_freq = joint_counts / trials, independent_counts / trials
    assert torch.allclose(joint_freq, independent_freq, atol=0.04)  # ~5 sigma of a binomial at n=4000
    assert joint_freq[-1] > 3 * joint_freq[0]  # and the scores matter


def test_gumbel_top_k_never_draws_minus_inf():
    logits = torch.tensor([0.0, float("-inf"), 1.0, float("-inf"), 2.0])
    for seed in range(20):
        drawn = gumbel_top_k(logits, 3, torch.Generator().manual_seed(seed))
        assert set(drawn.tolist()) == {0, 2, 4}


def test_score_functions():
    learner, reference = torch.full((3, 3), 2.0), torch.full((3, 3), 0.5)
    assert torch.equal(learnability(learner, reference), torch.full((3, 3), 1.5))
    assert torch.equal(hard_learner(learner, reference), learner)
    assert torch.equal(easy_reference(learner, reference), -reference)


def test_score_matrix_chunks_equal_the_whole():
    from flexi_jest.losses import sigmoid_pair_losses
    g = torch.Generator().manual_seed(0)
    emb = [torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1) for _ in range(4)]
    learner = (emb[0], emb[1], torch.tensor(2.0), torch.tensor(-3.0))
    reference = (emb[2], emb[3], torch.tensor(1.0), torch.tensor(-1.0))
    expected = sigmoid_pair_losses(*learner) - sigmoid_pair_losses(*reference)
    assert torch.allclose(score_matrix("learnability", learner, reference, chunk_size=7), expected, atol=1e-6)
    assert torch.allclose(score_matrix("hard_learner", learner, None, chunk_size=4), sigmoid_pair_losses(*learner))


def test_select_dispatch():
    scores = random_scores(20)
    g = torch.Generator().manual_seed(0)
    assert select("uniform", None, 5, 20, generator=g).numel() == 5
    assert select("joint", scores, 5, 20, 2, g).numel() == 5
    with pytest.raises(ValueError, match="unknown selection method"):
        select("magic", scores, 5, 20)


def unit_pairs(batch: int, dim: int, seed: int, scale: float, bias: float):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(batch, dim, generator=g), dim=-1)
    return image, text, torch.tensor(scale), torch.tensor(bias)


@pytest.mark.parametrize("score", ["learnability", "hard_learner", "easy_reference"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_from_embeddings_equals_selection_from_the_matrix(score, seed):
    from flexi_jest.selection import joint_select_from_embeddings, own_scores
    learner = unit_pairs(150, 16, seed, 2.3, -6.0)
    reference = unit_pairs(150, 8, seed + 100, 3.0, -8.0)
    matrix = score_matrix(score, learner, reference)
    assert torch.allclose(own_scores(score, learner, reference), matrix.diagonal(), atol=1e-5)
    for n_select, n_chunks in [(30, 16), (45, 4), (1, 1), (150, 8)]:
        from_matrix = joint_select(matrix, n_select, n_chunks, torch.Generator().manual_seed(seed))
        fast = joint_select_from_embeddings(score, learner, reference, n_select, n_chunks,
                                            torch.Generator().manual_seed(seed))
        assert torch.equal(from_matrix, fast), (n_select, n_chunks)


def test_independent_select_accepts_own_scores():
    scores = random_scores(30)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(independent_select(scores, 10, "sample", g1),
                       independent_select(scores.diagonal(), 10, "sample", g2))


# ---- the offline filter ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(pool=st.integers(1, 500), keep_ratio=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_offline_keep_mask_keeps_the_top_fraction(pool, keep_ratio, seed):
    from flexi_jest.selection import offline_keep_mask
    scores = torch.randn(pool, generator=torch.Generator().manual_seed(seed))
    keep, threshold = offline_keep_mask(scores, keep_ratio)
    assert int(keep.sum()) == max(1, round(keep_ratio * pool))
    assert threshold == float(scores[keep].min())
    if not keep.all():
        assert float(scores[~keep].max()) <= threshold  # nothing dropped scores above anything kept


def test_offline_keep_mask_threshold_is_the_quantile_and_rejects_bad_ratios():
    from flexi_jest.selection import offline_keep_mask
    scores = torch.arange(1000, dtype=torch.float32)  # 0 .. 999
    keep, threshold = offline_keep_mask(scores, 0.3)
    assert threshold == 700.0 and keep[700:].all() and not keep[:700].any()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            offline_keep_mask(scores, bad)


def test_pair_cosines_are_the_image_text_cosine():
    from flexi_jest.selection import pair_cosines
    image = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [-3.0, -4.0], [1.0, 0.0]])
    assert torch.allclose(pair_cosines(image, text), torch.tensor([1.0, -1.0, 2 ** -0.5]))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        pair_cosines(image, text[:2])


def test_offline_filter_selects_uniformly_within_a_batch():
    chosen = select("offline-filter", None, 5, 20, generator=torch.Generator().manual_seed(0))
    assert chosen.numel() == 5 == chosen.unique().numel()


def test_in_place_softplus_matches_torch_within_float_rounding():
    from flexi_jest.selection import _softplus_
    x = torch.cat([torch.linspace(-120.0, 120.0, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.7, 89.0])])
    fast = _softplus_(x.clone())
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast, F.softplus(x), rtol=1e-6, atol=1.5e-7)
