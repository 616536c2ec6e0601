"""Example scores and batch selection: uniform, independent and joint (JEST, Algorithm 1), and the offline filter.

Scores are [B, B] matrices over a super-batch of B pairs, built from per-pair SigLIP losses
(losses.sigmoid_pair_losses). Because the loss of a sub-batch S is sum_{i,j in S} L_ij, scoring a
sub-batch jointly means summing a block of the matrix; joint_select samples such blocks.

The offline filter (DataComp's CLIP-score filtering) needs no learner: it keeps the top fraction of the
whole pool by the reference's image-text cosine similarity, once, and the learner trains uniformly on
what it kept (offline_keep_mask; the training stream drops the rest, see reference_cache.OfflineFilter).
"""

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from flexi_jest.losses import sigmoid_pair_losses

SelectionMethod = Literal["uniform", "independent", "joint", "offline-filter"]
ScoreName = Literal["learnability", "hard_learner", "easy_reference"]


# ---- scores: [B, B] -> [B, B] -------------------------------------------------------------------


def learnability(learner_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """JEST's score: pairs the learner still gets wrong but the reference gets right. [B, B]"""
    return learner_losses - reference_losses


def hard_learner(learner_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """Prioritise what the learner finds hard (ignores the reference). [B, B]"""
    return learner_losses


def easy_reference(learner_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """Prioritise what the reference finds easy (ignores the learner). [B, B]"""
    return -reference_losses


SCORES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "learnability": learnability,
    "hard_learner": hard_learner,
    "easy_reference": easy_reference,
}


def score_matrix(
    score: ScoreName,
    learner: tuple[Tensor, Tensor, Tensor, Tensor],
    reference: tuple[Tensor, Tensor, Tensor, Tensor],
    chunk_size: int = 4096,
) -> Tensor:
    """The [B, B] score matrix of a super-batch from both models' embeddings.

    learner, reference: (image_emb [B, d], text_emb [B, d], logit_scale, logit_bias), embeddings
    L2-normalised (the two models may have different d). Rows are computed chunk_size at a time so
    that only the [B, B] result, never several [B, B] temporaries, is held. Returns fp32.
    """
    score_fn = SCORES[score]
    batch = learner[0].shape[0]
    out = torch.empty(batch, batch, dtype=torch.float32, device=learner[0].device)
    for start in range(0, batch, chunk_size):
        stop = min(start + chunk_size, batch)
        learner_block = reference_block = None
        if score != "easy_reference":
            learner_block = sigmoid_pair_losses(learner[0][start:stop], learner[1], learner[2], learner[3], start)
        if score != "hard_learner":
            reference_block = sigmoid_pair_losses(reference[0][start:stop], reference[1], reference[2], reference[3],
                                                  start)
        out[start:stop] = score_fn(learner_block, reference_block)
        del learner_block, reference_block
    return out


def own_scores(
    score: ScoreName,
    learner: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    reference: tuple[Tensor, Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """diag(score_matrix(...)) [B] in O(B d): each example's own score from its matched pair alone."""
    def positive_losses(model: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        image_emb, text_emb, logit_scale, logit_bias = model
        logits = logit_scale.float().exp() * (image_emb.float() * text_emb.float()).sum(-1) + logit_bias.float()
        return F.softplus(-logits)  # -log sigmoid(logit) of the positive pair

    learner_losses = positive_losses(learner) if score != "easy_reference" else None
    reference_losses = positive_losses(reference) if score != "hard_learner" else None
    return SCORES[score](learner_losses, reference_losses)


ROW_TILE_CPU = 4096  # rows of a [B, c] block computed at once on the CPU, so that the tile stays in cache


def _softplus_(x: Tensor) -> Tensor:
    """softplus(x) = log(1 + e^x). On the CPU in x's own storage, as max(x, 0) + log(1 + e^-|x|): the same
    within 1e-7 absolute and several times faster there than F.softplus, whose log1p this torch build does
    not vectorise (bench/selection_speed.py: the embedding path 3-4x faster in all); elsewhere F.softplus
    (one fused kernel)."""
    if x.device.type != "cpu":
        return F.softplus(x)
    positive = x.clamp(min=0)
    return x.abs_().neg_().exp_().add_(1).log_().add_(positive)


def _negative_loss_sums(model: tuple[Tensor, Tensor, float, float], chosen: Tensor, chosen_side: int) -> Tensor:
    """Sums over the chosen examples of one model's negative-pair losses, for every example of the batch [B].

    chosen_side 1: for each image i, sum_j softplus(logit(image i, text j)) over the chosen texts j (the row sums
    of the block S[:, chosen]); chosen_side 0: for each text i, the same over the chosen images j (the column
    sums of S[chosen, :]). Models as (image_emb [B, d], text_emb [B, d], temperature exp(t'), bias): fp32
    embeddings, Python-float temperature and bias (fused into the matmul)."""
    image_emb, text_emb, temperature, bias = model
    every, other = (image_emb, text_emb) if chosen_side == 1 else (text_emb, image_emb)
    picked = other.index_select(0, chosen).T.contiguous()  # [d, c]
    bias_term = every.new_full((1, 1), bias)
    batch = every.shape[0]
    tile = ROW_TILE_CPU if every.device.type == "cpu" else batch
    sums = every.new_empty(batch)
    for start in range(0, batch, tile):
        logits = torch.addmm(bias_term, every[start:start + tile], picked, alpha=temperature)  # [tile, c]
        sums[start:start + tile] = _softplus_(logits).sum(1)  # -log sigmoid(-logit): every such pair is a negative
    return sums


def _interaction_sums(
    score: ScoreName,
    learner: tuple[Tensor, Tensor, float, float] | None,
    reference: tuple[Tensor, Tensor, float, float] | None,
    chosen: Tensor,
) -> Tensor:
    """sum_{j in chosen} S[i, j] + S[j, i] for every example i [B], all pairs taken as negatives (z = -1).
    Every score in SCORES is linear in the two models' losses, so the score of the summed losses is the sum of
    the scores: each model's losses are summed first and the score is taken once, on [B] vectors."""
    def both_sides(model):
        if model is None:
            return None
        return _negative_loss_sums(model, chosen, 1) + _negative_loss_sums(model, chosen, 0)

    return SCORES[score](both_sides(learner) if score != "easy_reference" else None,
                         both_sides(reference) if score != "hard_learner" else None)


# ---- the offline filter: one score per pool sample, one threshold --------------------------------------


def pair_cosines(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Each pair's image-text cosine similarity (the CLIP score): image_emb [N, d], text_emb [N, d] -> [N] fp32.
    Embeddings need not be normalised; a zero vector gets cosine 0."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image_emb and text_emb must both be [N, d], got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def offline_keep_count(pool_size: int, keep_ratio: float) -> int:
    """How many of pool_size samples the offline filter keeps: round(keep_ratio * pool_size), at least 1."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if pool_size < 1:
        raise ValueError("the offline filter needs a non-empty pool")
    return max(1, round(keep_ratio * pool_size))


def offline_keep_mask(scores: Tensor, keep_ratio: float) -> tuple[Tensor, float]:
    """The offline filter over a whole pool: (keep [N] bool, threshold). scores [N] (e.g. pair_cosines).

    Keeps exactly offline_keep_count(N, keep_ratio) samples, those with the highest scores (ties broken by
    position, deterministically); threshold is the lowest kept score, i.e. the (1 - keep_ratio) quantile."""
    count = offline_keep_count(scores.numel(), keep_ratio)
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:count]
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[order] = True
    return keep, float(scores[order[-1]])


# ---- sampling ------------------------------------------------------------------------------------


def gumbel_top_k(logits: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k distinct indices sampled without replacement with p proportional to exp(logits). [N] -> [k]

    Adds i.i.d. Gumbel(0, 1) noise and takes the top k (the Gumbel-top-k trick). Entries equal to
    -inf are never drawn, provided k does not exceed the number of finite entries.
    """
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))
    return torch.topk(logits.float() + gumbel, k, sorted=False).indices


def _check_sizes(batch: int, n_select: int) -> None:
    if not 0 < n_select <= batch:
        raise ValueError(f"n_select must be in [1, {batch}] for a super-batch of {batch}, got {n_select}")


def uniform_select(
    batch_size: int, n_select: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """n_select distinct indices of range(batch_size), uniformly at random. -> LongTensor[n_select]"""
    _check_sizes(batch_size, n_select)
    return torch.randperm(batch_size, generator=generator, device=device)[:n_select]


def independent_select(
    scores: Tensor,
    n_select: int,
    mode: Literal["sample", "topk"] = "sample",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Select by each example's own score s_ii alone. scores [B, B] (or its diagonal [B]) -> LongTensor[n_select]

    mode "sample": without replacement, p proportional to exp(s_ii); "topk": the n_select highest.
    """
    _check_sizes(scores.shape[0], n_select)
    own = (scores.diagonal() if scores.ndim == 2 else scores).float()
    if mode == "topk":
        return torch.topk(own, n_select, sorted=False).indices
    if mode == "sample":
        return gumbel_top_k(own, n_select, generator)
    raise ValueError(f"mode must be 'sample' or 'topk', got {mode!r}")


def chunk_sizes(n_select: int, n_chunks: int) -> list[int]:
    """Split n_select into n_chunks near-equal draws (the first n_select % n_chunks get one more); zeros dropped."""
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
    base, extra = divmod(n_select, n_chunks)
    return [size for i in range(n_chunks) if (size := base + (1 if i < extra else 0)) > 0]


def joint_select(
    scores: Tensor, n_select: int, n_chunks: int = 16, generator: torch.Generator | None = None
) -> Tensor:
    """Joint example selection (JEST Algorithm 1): n_select distinct indices of a [B, B] score matrix.

    Draws the sub-batch in n_chunks chunks. The first chunk is sampled by each example's own score
    s_ii; every later chunk by the conditional score

        cond_i = s_ii + sum_{j chosen} (S_ij + S_ji)

    i.e. how much example i adds to the block score of the batch chosen so far; chosen examples get
    -inf. Each chunk is sampled without replacement with p proportional to exp(cond) (Gumbel-top-k).
    The chosen-set sums are updated incrementally from the new chunk's rows and columns, so the cost
    is O(B * n_select) on top of the matrix, with a loop over chunks only. Scores in any float
    dtype; sums accumulate in fp32. generator must live on scores' device. -> LongTensor[n_select]
    """
    batch = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] != batch:
        raise ValueError(f"scores must be a square [B, B] matrix, got shape {tuple(scores.shape)}")
    _check_sizes(batch, n_select)
    own = scores.diagonal().float()  # [B]
    interaction = torch.zeros_like(own)  # [B]: sum over chosen j of S_ij + S_ji
    taken = torch.zeros(batch, dtype=torch.bool, device=scores.device)
    chosen: list[Tensor] = []
    for size in chunk_sizes(n_select, n_chunks):
        cond = (own + interaction).masked_fill(taken, float("-inf"))
        new = gumbel_top_k(cond, size, generator)  # [size]
        chosen.append(new)
        taken[new] = True
        interaction += scores.index_select(1, new).float().sum(1) + scores.index_select(0, new).float().sum(0)
    return torch.cat(chosen)


@torch.no_grad()
def joint_select_from_embeddings(
    score: ScoreName,
    learner: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    reference: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    n_select: int,
    n_chunks: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """joint_select(score_matrix(score, learner, reference), ...) without the [B, B] matrix.

    Algorithm 1 reads the score matrix only on its diagonal and on the rows and columns of chosen
    examples, so those are computed from the embeddings as they are needed: O(B * n_select * d)
    time and O(B * chunk) memory instead of O(B^2) for both. A row or column of a chosen example
    only matters for examples not yet chosen, whose pairs with it are all negatives. For the same
    generator it draws the same Gumbel noise as joint_select and so the same indices, up to float
    summation order. learner/reference: (image_emb [B, d], text_emb [B, d], logit_scale, logit_bias).
    """
    some = learner if learner is not None else reference
    batch = some[0].shape[0]
    _check_sizes(batch, n_select)
    own = own_scores(score, learner, reference).float()  # [B]

    def prepared(model):  # fp32 embeddings, temperature and bias as floats for addmm (one sync per call)
        if model is None:
            return None
        return model[0].float(), model[1].float(), float(model[2].float().exp()), float(model[3])

    learner, reference = prepared(learner), prepared(reference)
    interaction = torch.zeros_like(own)
    taken = torch.zeros(batch, dtype=torch.bool, device=own.device)
    chosen: list[Tensor] = []
    for size in chunk_sizes(n_select, n_chunks):
        cond = (own + interaction).masked_fill(taken, float("-inf"))
        new = gumbel_top_k(cond, size, generator)
        chosen.append(new)
        taken[new] = True
        interaction += _interaction_sums(score, learner, reference, new)  # S[:, new] row + S[new, :] column sums
    return torch.cat(chosen)


def select(
    method: SelectionMethod,
    scores: Tensor | None,
    n_select: int,
    batch_size: int,
    n_chunks: int = 16,
    generator: torch.Generator | None = None,
    independent_mode: Literal["sample", "topk"] = "sample",
) -> Tensor:
    """Dispatch on the selection method; scores [B, B] is unused (may be None) for uniform and offline-filter
    (its filtering happens once over the pool, before the stream: within a batch it is uniform)."""
    if method in ("uniform", "offline-filter"):
        device = scores.device if scores is not None else (generator.device if generator is not None else "cpu")
        return uniform_select(batch_size, n_select, generator, device)
    if scores is None:
        raise ValueError(f"method {method!r} needs a score matrix")
    if method == "independent":
        return independent_select(scores, n_select, independent_mode, generator)
    if method == "joint":
        return joint_select(scores, n_select, n_chunks, generator)
    raise ValueError(f"unknown selection method {method!r}; expected uniform, independent, joint or offline-filter")
