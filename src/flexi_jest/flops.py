"""FLOP accounting (docs/method.md#flop-accounting): analytic forward FLOPs of each tower, and the per-run ledger.

A multiply-add counts as 2 FLOPs, as torch.utils.flop_counter does; like it, we count the matrix
products (patch embedding, attention projections and products, MLPs, output heads) and ignore
element-wise work (norms, activations, softmax). A training step is forward + backward = 3 forwards.
"""

from flexi_jest.config import FlopsBreakdown, ModelConfig, TrainLearnerConfig


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of `depth` pre-norm transformer blocks over `tokens` tokens of size `width`."""
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * width * (3 * width) + 2 * tokens * width * width  # qkv + output projection
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v (all heads together)
    mlp = 2 * 2 * tokens * width * hidden
    return depth * (projections + attention + mlp)


def map_pool_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of a MAP head (timm's AttentionPoolLatent, one latent query) over `tokens` tokens: the
    query and key-value projections, the query's attention products, the output projection and the MLP."""
    hidden = int(width * mlp_ratio)
    projections = 2 * width * width + 2 * tokens * width * (2 * width) + 2 * width * width  # q, kv, out
    attention = 2 * 2 * tokens * width  # q @ k^T and attn @ v for the one query
    return projections + attention + 2 * 2 * width * hidden


def image_forward_flops(cfg: ModelConfig, patch_size: int | None = None) -> int:
    """Forward FLOPs of the image tower (flexi_jest.models.flexivit) for one image at `patch_size` (default:
    the base): the patch embedding, the transformer over the patches and the prefix (class, register)
    tokens, the MAP head over the patches if the tower pools with one, the output projection if it has one."""
    patch = patch_size or cfg.patch_size
    patches = (cfg.image_size // patch) ** 2
    patch_embed = 2 * patches * (3 * patch * patch) * cfg.vision_width
    tokens = patches + cfg.vision_prefix_tokens
    pool = map_pool_flops(patches, cfg.vision_width) if cfg.vision_map_pool else 0
    head = 2 * cfg.vision_width * cfg.embed_dim if cfg.vision_projection else 0
    return patch_embed + transformer_flops(tokens, cfg.vision_width, cfg.vision_depth) + pool + head


def text_forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the text tower for one caption (full context; the causal mask saves no FLOPs in SDPA)."""
    head = 2 * cfg.text_width * cfg.embed_dim
    return transformer_flops(cfg.context_length, cfg.text_width, cfg.text_depth) + head


def pair_forward_flops(cfg: ModelConfig, patch_size: int | None = None) -> int:
    """Forward FLOPs of both towers for one image-caption pair."""
    return image_forward_flops(cfg, patch_size) + text_forward_flops(cfg)


def sigmoid_loss_flops(batch: int, embed_dim: int) -> int:
    """The [B, B] logits matmul of the sigmoid loss."""
    return 2 * batch * batch * embed_dim


def training_step_flops(cfg: ModelConfig, batch: int, patch_sizes: list[int]) -> int:
    """Forward + backward (3x forward) FLOPs of one step on `batch` pairs split evenly over patch_sizes."""
    forward = 0
    for i, patch in enumerate(patch_sizes):
        part = batch // len(patch_sizes) + (1 if i < batch % len(patch_sizes) else 0)
        forward += part * image_forward_flops(cfg, patch)
    forward += batch * text_forward_flops(cfg) + sigmoid_loss_flops(batch, cfg.embed_dim)
    return 3 * forward


def scoring_step_flops(
    cfg: ModelConfig,
    super_batch: int,
    patch_size: int | None,
    n_select: int,
    method: str,
    uses_learner: bool = True,
    reference_dim: int | None = None,
) -> int:
    """FLOPs of scoring one super-batch: the learner's no-grad forward over it at the scoring patch size
    (unless the score ignores the learner) plus the pair-score matmuls selection needs: for joint
    selection from embeddings the rows and columns of the chosen examples (2 blocks of [B, n_select]
    per model), for independent selection the B matched pairs only. The reference costs no forward here:
    its embeddings are cached (its caching pass is counted once, as reference_caching)."""
    forward = super_batch * pair_forward_flops(cfg, patch_size) if uses_learner else 0
    dims = ([cfg.embed_dim] if uses_learner else []) + ([reference_dim] if reference_dim else [])
    if method == "joint":
        pair_terms = sum(2 * 2 * super_batch * n_select * dim for dim in dims)
    else:
        pair_terms = sum(2 * super_batch * dim for dim in dims)
    return forward + pair_terms


def offline_filter_flops(pool_size: int, reference_dim: int) -> int:
    """The offline filter's score: one image-text cosine per pool sample from the cached embeddings (three
    length-d dot products). Counted once, with the reference's caching pass."""
    return 6 * pool_size * reference_dim


def uses_reference(cfg: TrainLearnerConfig) -> bool:
    """Whether a learner run relies on the reference (and is charged its share): every score but hard_learner
    under independent / joint selection, the offline filter, and selection after an offline pre-filter."""
    return (cfg.method == "offline-filter" or cfg.prefilter_keep_ratio is not None
            or (cfg.method != "uniform" and cfg.score != "hard_learner"))


def learner_step_flops(cfg: TrainLearnerConfig, reference_dim: int) -> int:
    """FLOPs of one learner step (scoring + training), as the training loop counts them. Uniform and the
    offline filter train on the sub-batch they draw and score nothing."""
    train = training_step_flops(cfg.model, cfg.sub_batch_size, cfg.train_patch_sizes)
    if cfg.method in ("uniform", "offline-filter"):
        return train
    scoring = scoring_step_flops(cfg.model, cfg.super_batch_size, cfg.scoring_patch_size or cfg.model.patch_size,
                                 cfg.sub_batch_size, cfg.method, cfg.score != "easy_reference",
                                 reference_dim if cfg.score != "hard_learner" else None)
    return train + scoring


def steps_for_budget(budget: float, cfg: TrainLearnerConfig, reference_share: float, reference_dim: int) -> int:
    """Steps a learner runs on a total-FLOP budget (the benchmark's rule, docs/method.md#budgets): the budget less the
    reference's share where the method uses the reference, divided by its step's FLOPs; at least 1."""
    own = budget - (reference_share if uses_reference(cfg) else 0.0)
    return max(1, round(own / learner_step_flops(cfg, reference_dim)))


def add(ledger: FlopsBreakdown, **parts: float) -> FlopsBreakdown:
    """A copy of ledger with parts added, e.g. add(ledger, learner_scoring=1e9)."""
    return ledger.model_copy(update={k: getattr(ledger, k) + v for k, v in parts.items()})
