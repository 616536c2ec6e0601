"""One Pydantic config and one result per stage; the CLI, the KFP components and the pipeline share them.

Defaults are the `tiny` profile (every stage in a minute or two on 2 CPU cores). `PROFILES` holds
the overrides of the other profiles, e.g. `paper` (ViT-B/16, 32k sub-batch, 16 chunks, filter 80 %).
Unknown fields and wrong types are rejected with the field named (extra="forbid"), before any work:
integers are strict (`steps: true` or `steps: 2.5` is an error, not 1 or 2), floats are finite and never
booleans, devices are auto, cpu, cuda, cuda:N or mps, and the fields' relations are checked (n_chunks
within the sub-batch, a sub-batch of at least 2, eval_every with eval_data).
"""

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from flexi_jest.data.access import DataAccess, spec_problem
from flexi_jest.errors import BadInput

DATA_ACCESS_DESCRIPTION = ("what this stage's dataset specs may reach besides storage: pipe: commands "
                           "(pipe_commands: the programs allowed) and http(s) (allow_http) are off unless enabled "
                           "here (data/access.py, docs/security.md)")


def _eval_set_uri(item: Any) -> Any:
    """The uri of an eval_data entry ('name=uri', 'uri', a dict or an EvalSet); the entry itself if unparsable."""
    try:
        return EvalSet.parse(item).uri
    except (ValueError, TypeError):
        return item


def check_data_access(access: DataAccess, specs: dict[str, Any]) -> None:
    """ValueError '<field>: <why>' for the first dataset spec (field name -> spec) that access refuses."""
    for field, spec in specs.items():
        problem = spec_problem(spec, access) if isinstance(spec, str) else None
        if problem:
            raise ValueError(f"{field}: {problem}")


def _eval_specs(items: list[Any]) -> dict[str, Any]:
    return {f"eval_data.{index}": _eval_set_uri(item) for index, item in enumerate(items)}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigModel(StrictModel):
    """A stage config (or a part of one): also no NaN or infinite float anywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value}")
    return value


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _known_device(value: str) -> str:
    if not DEVICE.fullmatch(value):
        raise ValueError(f"unknown device {value!r}: expected auto, cpu, cuda, cuda:N or mps")
    return value


# Strict: an int field takes ints only (YAML/JSON numbers and --set values parse to ints), never True or 2.5.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
Device = Annotated[str, AfterValidator(_known_device)]


class ReadStatsSummary(StrictModel):
    """What reading a split did (shards.ReadStats, frozen into a result): every sample not used, by reason.

    Reasons that lose samples: missing_image, empty_caption, non_utf8_caption, bad_caption (NUL bytes),
    bad_image, bad_meta, corrupt_member, oversized_member (a member over its size cap, never read), bad_label (an
    eval .cls that is not a class index); reasons that damage a shard (and lose what it held): missing_shard,
    corrupt_shard, short_shard, checksum_mismatch, oversized_shard (a compressed shard expanding past its limit).
    Duplicate keys (the same key again in the split) are kept and counted.
    """

    samples: int = Field(0, description="samples read, decoded and used")
    skipped: dict[str, int] = Field(default_factory=dict, description="problems by reason (see the class doc)")
    duplicate_keys: int = Field(0, description="samples whose key was already read in this pass (kept)")
    errors: list[str] = Field(default_factory=list, description="the first problems' messages")

    @property
    def complete(self) -> bool:
        """True when nothing was skipped."""
        return not self.skipped


# ---- model -----------------------------------------------------------------------------------------


class ModelConfig(ConfigModel):
    """The dual encoder's architecture. Every model is an open_clip CLIP model (flexi_jest.models): either
    the open_clip model `name` (one of open_clip.list_models() whose image tower is open_clip's own ViT, e.g.
    ViT-B-32, ViT-B-16, ViT-S-16, or a timm VisionTransformer, e.g. SigLIP's MAP-pooled ViT), whose sizes
    below are then read from its open_clip config (and timm's model), or, without a
    name, the project's SigLIP-style config built from the sizes below (average-pooled image tower, logit
    scale t' = log 10 and bias -10 at init). A string is a preset (`tiny`, `small`, `vit_b16`) or an open_clip
    name: `--set model=small`, `--set model=ViT-B-32`."""

    name: str | None = Field(None, description="open_clip model name; None: the project's config from the sizes below")
    image_size: Int = Field(32, gt=0, description="input images are resized to image_size x image_size")
    patch_size: Int = Field(8, gt=0, description="base patch size of the FlexiViT kernel (the training patch)")
    vision_width: Int = Field(96, gt=0)
    vision_depth: Int = Field(3, gt=0)
    vision_heads: Int = Field(3, gt=0)
    text_width: Int = Field(96, gt=0)
    text_depth: Int = Field(2, gt=0)
    text_heads: Int = Field(2, gt=0)
    context_length: Int = Field(16, gt=2, description="text tokens per caption, start/end included")
    vocab_size: Int = Field(49408, gt=0, description="open_clip's BPE vocabulary")
    embed_dim: Int = Field(64, gt=0, description="shared embedding size")
    # The image tower's shape beyond its sizes (FLOP accounting); only a named open_clip model sets these.
    vision_prefix_tokens: Int = Field(1, ge=0, description="class and register tokens before the patch tokens "
                                      "(open_clip's ViT: 1, SigLIP's timm ViT: 0)")
    vision_map_pool: bool = Field(False, description="the image tower pools with a MAP head (one latent query "
                                  "attending over the patch tokens, then an MLP), as SigLIP's timm ViT")
    vision_projection: bool = Field(True, description="a linear map width -> embed_dim ends the image tower "
                                    "(a timm tower with timm_proj 'none' has none: its width is embed_dim)")
    mean: tuple[Float, Float, Float] = Field((0.5, 0.5, 0.5), description="per-channel pixel mean (pixels in [0, 1])")
    std: tuple[Float, Float, Float] = Field((0.5, 0.5, 0.5), description="per-channel pixel std: x' = (x - mean) / std")

    @model_validator(mode="before")
    @classmethod
    def _by_name(cls, data: Any) -> Any:
        """A preset or open_clip name (a string, or a dict with `name`) becomes its full config; other
        fields given beside an open_clip name must agree with its open_clip config."""
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict) or data.get("name") is None:
            return data
        name = data["name"]
        if name.startswith(PRESET_OPEN_CLIP_PREFIX) and name[len(PRESET_OPEN_CLIP_PREFIX):] in MODEL_PRESETS:
            name = name[len(PRESET_OPEN_CLIP_PREFIX):]  # a preset under its open_clip name
        if name in MODEL_PRESETS:
            return {**MODEL_PRESETS[name].model_dump(), **{k: v for k, v in data.items() if k != "name"}}
        from flexi_jest.models.open_clip_names import fields_from_open_clip  # open_clip (torch): named models only

        fields = fields_from_open_clip(name)
        for key, value in data.items():
            if key in fields and _differs(value, fields[key]):
                raise ValueError(f"{key}={value!r} conflicts with open_clip's {name} config ({key}={fields[key]!r})")
        return {**data, **fields}

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width {self.vision_width} must be divisible by vision_heads {self.vision_heads}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}")
        if self.name is None and (self.vision_prefix_tokens, self.vision_map_pool,
                                  self.vision_projection) != (1, False, True):
            raise ValueError("vision_prefix_tokens, vision_map_pool and vision_projection describe a named open_clip "
                             "model's image tower; the project's own config (no name) has 1 class token, average "
                             "pooling and a projection")
        return self


def _differs(given: Any, expected: Any) -> bool:
    if isinstance(given, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(given) != len(expected) or any(_differs(a, b) for a, b in zip(given, expected))
    return given != expected


MODEL_PRESETS: dict[str, ModelConfig] = {}
PRESET_OPEN_CLIP_PREFIX = "flexi-jest-"  # the presets' names in open_clip's registry (flexi_jest.models.configs)
MODEL_PRESETS.update({
    # CPU tests and the README demo: 32 px, patch 8 (16 tokens) / 16 (4 tokens) as the 16/32 analogue.
    "tiny": ModelConfig(),
    # A laptop-scale model: 64 px, patch 8/16.
    "small": ModelConfig(
        image_size=64, vision_width=192, vision_depth=6, vision_heads=3,
        text_width=192, text_depth=4, text_heads=3, context_length=24, embed_dim=128,
    ),
    # The paper's ViT-B/16 SigLIP towers.
    "vit_b16": ModelConfig(
        image_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
        text_width=768, text_depth=12, text_heads=12, context_length=64, embed_dim=768,
    ),
})


Beta = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=0.0, lt=1.0)]


class OptimConfig(ConfigModel):
    lr: Float = Field(2.5e-4, gt=0, description=(
        "peak learning rate (the tiny preset's: the best of a uniform-only sweep on a validation split, "
        "docs/results.md; the paper profile sets 1e-3)"))
    weight_decay: Float = Field(1e-4, ge=0)
    warmup_steps: Int = Field(20, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW's (beta1, beta2), each in [0, 1)")
    grad_clip: Float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")


# ---- stage 0: data ------------------------------------------------------------------------------------


class NoiseConfig(BaseModel):
    """Probability that a pool sample suffers each kind of noise; the rest (1 - total) stay clean."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    KINDS: ClassVar[tuple[str, ...]] = ("mismatched", "uninformative", "corrupted", "blank", "near_duplicate")

    # share of each kind in a total rate, used by at_rate (sums to 1)
    AT_RATE_PROPORTIONS: ClassVar[dict[str, float]] = {
        "mismatched": 0.5, "uninformative": 0.2, "corrupted": 0.1, "blank": 0.1, "near_duplicate": 0.1,
    }

    mismatched: Float = Field(0.0, ge=0.0, le=1.0, description="caption of another random sample")
    uninformative: Float = Field(0.0, ge=0.0, le=1.0, description="generic caption ('image', 'IMG_2041')")
    corrupted: Float = Field(0.0, ge=0.0, le=1.0, description="image drowned in noise or blocks, caption kept")
    blank: Float = Field(0.0, ge=0.0, le=1.0, description="flat or near-flat image, caption kept")
    near_duplicate: Float = Field(0.0, ge=0.0, le=1.0, description="perturbed copy of an earlier sample")

    @model_validator(mode="after")
    def _fractions_sum_to_at_most_one(self) -> "NoiseConfig":
        if self.total > 1.0 + 1e-9:
            parts = ", ".join(f"{kind}={getattr(self, kind)}" for kind in self.KINDS)
            raise ValueError(f"noise fractions must sum to at most 1, got {self.total:.4g} ({parts})")
        return self

    @property
    def total(self) -> float:
        """The share of samples that are noisy in any way."""
        return sum(getattr(self, kind) for kind in self.KINDS)

    @classmethod
    def at_rate(cls, rate: float) -> "NoiseConfig":
        """A total noise rate split by AT_RATE_PROPORTIONS: at_rate(0.8) -> mismatched 0.4,
        uninformative 0.16, corrupted 0.08, blank 0.08, near_duplicate 0.08."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        return cls(**{kind: round(rate * share, 12) for kind, share in cls.AT_RATE_PROPORTIONS.items()})


class MakeDataConfig(ConfigModel):
    """source 'generate': write a generated dataset's splits; 'register': check the user's own curated / pool / eval
    datasets (dataset specs, data/specs.py) and record them, writing only under out_dir (data/register.py)."""

    source: Literal["generate", "register"] = "generate"
    dataset: Literal["shapes", "emoji", "digits"] = "shapes"
    out_dir: str = Field("runs/data", description=(
        "generate: the dataset's root, splits in out_dir/{curated,pool,eval}; register: where the registration "
        "manifest and the training splits' shard lists go (never the user's data)"))
    curated: str | None = Field(None, description="register: the curated dataset's spec, e.g. s3://team/curated/{0000..0099}.tar")
    pool: str | None = Field(None, description="register: the pool's spec, e.g. s3://team/laion/ (img2dataset shards)")
    eval: str | None = Field(None, description="register: the eval set's spec")
    num_samples: dict[Literal["curated", "pool", "eval"], Int] = Field(default_factory=dict, description=(
        "register: explicit sample counts by split, overriding the manifest / img2dataset *_stats.json counts"))
    check_shards: Int = Field(4, ge=1, description="register: shards opened and read through per split")
    check_images: Int = Field(32, ge=1, description="register: images decoded per split")
    count_max_shards: Int = Field(64, ge=0, description=(
        "register: a split with unknown counts and at most this many shards is counted by reading it"))
    allow_eval_overlap: bool = Field(False, description=(
        "register: accept an eval split that shares images (identical bytes) with curated or pool in the shards "
        "read; refused by default, since evaluating on training data inflates the metric promotion compares"))
    seed: Int = 0
    image_size: Int = Field(32, gt=0)
    curated_size: Int = Field(2000, ge=1)
    pool_size: Int = Field(12000, ge=1)
    eval_size: Int = Field(1000, ge=1)
    noise: NoiseConfig = Field(default_factory=lambda: NoiseConfig.at_rate(0.6))
    samples_per_shard: Int = Field(1000, ge=1)
    image_format: Literal["png", "jpg"] = "png"
    data_access: DataAccess = Field(default_factory=DataAccess, description=DATA_ACCESS_DESCRIPTION)

    @model_validator(mode="after")
    def _check_source(self) -> "MakeDataConfig":
        specs = {"curated": self.curated, "pool": self.pool, "eval": self.eval}
        if self.source == "register":
            missing = [name for name, spec in specs.items() if not spec]
            if missing:
                raise ValueError(f"source 'register' needs a dataset spec for {', '.join(missing)}")
            check_data_access(self.data_access, specs)
        elif any(specs.values()):
            given = ", ".join(name for name, spec in specs.items() if spec)
            raise ValueError(f"{given}: dataset specs are read with source 'register' (source is 'generate')")
        return self


class SplitInfo(StrictModel):
    path: str = Field(description="what later stages read: a directory or any dataset spec (a registered training "
                      "split: the shard list registration resolved it to)")
    spec: str | None = Field(None, description="the dataset spec the split was registered from; None: generated")
    num_samples: int | None = Field(description="None: unknown (a pool too large to count)")
    num_shards: int


class MakeDataResult(StrictModel):
    dataset: str
    out_dir: str
    splits: dict[str, SplitInfo]
    noise_counts: dict[str, int]
    seconds: float
    checks: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "register: per split, what was checked (shards read, images decoded, image sizes, skipped samples, empty "
        "shards); "
        "'overlap': the keys and images each pair of splits shares in the shards read"))


# ---- shared training settings ---------------------------------------------------------------------------


class TrainingConfig(ConfigModel):
    """Settings shared by the reference and the learner."""

    out_dir: str
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    steps: Int = Field(200, ge=1)
    seed: Int = 0
    device: Device = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    train_patch_sizes: list[Int] = Field(default_factory=lambda: [8], min_length=1, description=(
        "patch sizes the (sub-)batch trains at, split evenly; Flexi-JEST: [16, 32] (tiny: [8, 16])"))
    loss_chunk_size: Int | None = Field(None, ge=1, description="row chunk of the sigmoid loss; None = whole batch")
    micro_batch_size: Int | None = Field(None, ge=1, description=(
        "gradient accumulation for (sub-)batches that do not fit: the towers run this many pairs at a time, "
        "first without grad for all the embeddings, then again with the loss's gradient per micro-batch; "
        "one sigmoid loss over the whole batch (the gradients equal the single-batch ones). None = whole batch"))
    precision: Literal["fp32", "amp", "bf16"] = Field("amp", description=(
        "open_clip's names: 'fp32'; 'amp' bf16 autocast on CUDA (none on the CPU); 'bf16' bf16 autocast everywhere"))
    init_checkpoint: str | None = Field(None, description=(
        "start from this open_clip checkpoint instead of from scratch: a file (local or s3://) that "
        "open_clip.create_model(name, pretrained=file) reads (flexi-jest model files too), or a pretrained "
        "tag of model.name already in the local cache"))
    compile: bool = Field(False, description="torch.compile the towers for the training forward (GPU speed path)")
    processes: Int = Field(0, ge=0, description=(
        "data-parallel processes (DDP): 0 = one per visible GPU (one process without GPUs); N > 1 starts N under "
        "torchrun (gloo on CPUs); ignored inside torchrun, which sets the world itself"))
    data_streams: Int = Field(8, ge=1, description=(
        "independent sample streams the data is read as (data/loader.py); fixed for a run: the number of processes "
        "must divide it, and a checkpoint resumes only with the same value"))
    data_workers: Int = Field(0, ge=0,
                              description="decoding processes per training process; 0: decode in its reading thread")
    train_crop: Literal["center", "random_resized"] = Field("center", description=(
        "training images: 'center' (resize the shorter side, centre crop; the generated data passes unchanged) or "
        "'random_resized' (open_clip's RandomResizedCrop, scale 0.9-1.0, seeded per sample)"))
    checkpoint_every: Int = Field(100, ge=1)
    resume: bool = Field(True, description="continue from out_dir's latest checkpoint if there is one (of this config)")
    overwrite: bool = Field(False, description=(
        "remove an earlier run's checkpoints and result from out_dir and start afresh; without it, out_dir "
        "holding another config's work is refused and a finished run of this config is returned as it is"))
    log_every: Int = Field(10, ge=1)
    progress: bool = True
    eval_every: Int = Field(0, ge=0, description="evaluate every N steps (and at the end) on eval_data; 0: never")
    eval_data: list[str] = Field(default_factory=list, description="eval splits for eval_every")
    eval_max_samples: Int | None = Field(500, ge=1, description="samples per eval split during training")
    max_consecutive_bad_samples: Int = Field(10_000, ge=0, description=(
        "fail when this many training samples in a row are unusable (undecodable image, blank caption, ...); "
        "0: no limit. A whole epoch without a usable sample fails regardless"))
    data_access: DataAccess = Field(default_factory=DataAccess, description=DATA_ACCESS_DESCRIPTION)

    @model_validator(mode="after")
    def _check_data_access(self) -> "TrainingConfig":
        check_data_access(self.data_access, {"data": getattr(self, "data", None), "pool": getattr(self, "pool", None),
                                             **_eval_specs(self.eval_data)})
        return self

    @model_validator(mode="after")
    def _check_patches(self) -> "TrainingConfig":
        for patch in self.train_patch_sizes:
            if self.model.image_size % patch:
                raise ValueError(f"train_patch_sizes: {patch} does not divide model.image_size {self.model.image_size}")
        if self.eval_every > 0 and not self.eval_data:
            raise ValueError(f"eval_every: {self.eval_every} asks for evaluations during training but eval_data is "
                             "empty; give eval_data (the eval splits) or set eval_every to 0")
        return self


class FlopsBreakdown(StrictModel):
    """FLOPs by part (docs/method.md, 'FLOP accounting'); the reference's share is counted once."""

    learner_scoring: float = 0.0
    learner_training: float = 0.0
    reference_training: float = 0.0
    reference_caching: float = 0.0

    @property
    def total(self) -> float:
        return self.learner_scoring + self.learner_training + self.reference_training + self.reference_caching


class TrainResult(StrictModel):
    out_dir: str
    checkpoint: str = Field(description="the final model file (weights + model config)")
    checkpoint_sha256: str
    open_clip_dir: str = Field("",
                               description="the model as an open_clip checkpoint (export.py): config JSON + weights")
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float = Field(description="trained (sub-batch) images per second of wall time")
    flops: FlopsBreakdown
    total_flops: float
    metrics_path: str
    selection: dict[str, float] = Field(default_factory=dict, description="mean selection statistics")
    world_size: int = Field(1, description="processes that trained it (torchrun / a PyTorchJob)")
    read_stats: ReadStatsSummary = Field(default_factory=ReadStatsSummary, description=(
        "the training stream's reads, all epochs (rank 0's: every rank reads the same stream)"))


# ---- stage 1: reference -------------------------------------------------------------------------------------


class TrainReferenceConfig(TrainingConfig):
    out_dir: str = "runs/reference"
    data: str = Field("runs/data/curated", description="the curated data: a dataset spec (data/specs.py)")
    data_mode: Literal["epoch", "resampled"] = Field("epoch", description="'epoch': every shard once per epoch; "
                                                     "'resampled': shards drawn with replacement")
    batch_size: Int = Field(128, ge=2)
    steps: Int = Field(300, ge=1)


# ---- stage 2: reference cache -------------------------------------------------------------------------------


class CacheReferenceConfig(ConfigModel):
    reference: str = Field("runs/reference/model.pt", description="the frozen reference's model file")
    pool: str = Field("runs/data/pool",
                      description="the pool whose samples are embedded: a dataset spec (data/specs.py)")
    out_dir: str | None = Field(None, description=(
        "cache directory; default: pool/refcache-<sha12> for generated data, else refcache-<sha12> beside the "
        "reference's model file (never inside a user's dataset)"))
    patch_size: Int | None = Field(None, ge=1,
                                   description="patch size of the reference's image forward; default its base")
    batch_size: Int = Field(256, ge=1)
    device: Device = "auto"
    data_access: DataAccess = Field(default_factory=DataAccess, description=DATA_ACCESS_DESCRIPTION)

    @model_validator(mode="after")
    def _check_data_access(self) -> "CacheReferenceConfig":
        check_data_access(self.data_access, {"pool": self.pool})
        return self


class CacheReferenceResult(StrictModel):
    cache_dir: str
    reference_sha256: str
    num_samples: int
    num_shards: int
    skipped: dict[str, int]
    seconds: float
    flops: float = Field(description="the reference's forward FLOPs over the pool (counted once)")
    read_stats: ReadStatsSummary = Field(default_factory=ReadStatsSummary, description="the pass over the pool")


# ---- stage 3: learner ---------------------------------------------------------------------------------------


class TrainLearnerConfig(TrainingConfig):
    out_dir: str = "runs/learner"
    pool: str = Field("runs/data/pool", description="the pool: a dataset spec (data/specs.py)")
    data_mode: Literal["epoch", "resampled"] = Field("resampled", description="'resampled': shards drawn with "
                                                     "replacement, no epochs (a pool); 'epoch': every shard once per "
                                                     "epoch")
    reference_cache: str | None = Field(None, description="cache directory from cache-reference; needed unless uniform")
    reference_sha256: str | None = Field(None, description="if set, the cache must have been made by this reference")
    method: Literal["uniform", "independent", "joint", "offline-filter"] = Field("joint", description=(
        "offline-filter: keep the top offline_keep_ratio of the pool by the reference's cached image-text cosine, "
        "then train uniformly on it (no learner scoring; the reference's share is charged)"))
    score: Literal["learnability", "hard_learner", "easy_reference"] = "learnability"
    independent_mode: Literal["sample", "topk"] = "sample"
    filter_ratio: Float = Field(0.8, ge=0.0, lt=1.0, description="fraction of the super-batch discarded")
    n_chunks: Int = Field(16, ge=1)
    offline_keep_ratio: Float = Field(0.3, gt=0.0, le=1.0, description=(
        "offline-filter: fraction of the pool kept, by the reference's cosine (DataComp's CLIP-score filter: 0.3)"))
    prefilter_keep_ratio: Float | None = Field(None, gt=0.0, le=1.0, description=(
        "independent / joint: first keep only this fraction of the pool by the reference's cached image-text cosine "
        "(the offline filter), then select from what is kept ('filter+jest'); None: select from the whole pool"))
    selection_scope: Literal["global", "local"] = Field("global", description=(
        "with several processes: 'global' gathers the super-batch's embeddings and selects over all of it "
        "(equal to one process); 'local' selects within each rank's shard, without the gather"))
    super_batch_size: Int = Field(640, ge=2, description="B; the sub-batch is round(B * (1 - filter_ratio))")
    scoring_patch_size: Int | None = Field(None, ge=1,
                                           description="learner patch size when scoring; default model.patch_size")
    scoring_precision: Literal["fp32", "amp", "bf16"] | None = Field(None, description=(
        "precision of the learner's scoring forward (no gradient); None: the training precision. 'bf16' on a CPU "
        "with bf16 instructions scores 1.5x faster than fp32 (bench/scoring_pass.py)"))
    reference_training_flops: Float = Field(0.0, ge=0,
                                            description="the reference's training FLOPs, counted once in the total")
    reference_caching_flops: Float = Field(0.0, ge=0, description="the reference's pass over the pool, counted once")

    @property
    def sub_batch_size(self) -> int:
        """b = round(B * (1 - filter_ratio)), at least 2 (validated)."""
        return round(self.super_batch_size * (1.0 - self.filter_ratio))

    @model_validator(mode="after")
    def _check_learner(self) -> "TrainLearnerConfig":
        if self.method == "offline-filter" and self.reference_cache is None:
            raise ValueError("reference_cache is required for method='offline-filter' (it filters by the reference's "
                             "cached cosines)")
        if self.prefilter_keep_ratio is not None and self.method not in ("independent", "joint"):
            raise ValueError(f"prefilter_keep_ratio is for method 'independent' or 'joint' (the offline filter, then "
                             f"selection), not {self.method!r}: for the offline filter alone use offline_keep_ratio")
        if self.prefilter_keep_ratio is not None and self.reference_cache is None:
            raise ValueError("reference_cache is required with prefilter_keep_ratio (it filters by the reference's "
                             "cached cosines)")
        if self.method not in ("uniform",
                               "offline-filter") and self.reference_cache is None and self.score != "hard_learner":
            raise ValueError(f"reference_cache is required for method={self.method!r} with score={self.score!r}")
        sub_batch = self.sub_batch_size
        if sub_batch < 2:
            raise ValueError(
                f"super_batch_size: {self.super_batch_size} with filter_ratio {self.filter_ratio} leaves a sub-batch "
                f"of "
                f"{sub_batch} (round(super_batch_size * (1 - filter_ratio))); the sigmoid loss needs at least 2 pairs")
        if self.method == "joint" and self.n_chunks > sub_batch:
            raise ValueError(
                f"n_chunks: {self.n_chunks} is larger than the sub-batch {sub_batch} (super_batch_size "
                f"{self.super_batch_size} x (1 - filter_ratio {self.filter_ratio})); joint selection draws at least "
                "one example per chunk: lower n_chunks")
        patch = self.scoring_patch_size or self.model.patch_size
        if self.model.image_size % patch:
            raise ValueError(f"scoring_patch_size {patch} does not divide model.image_size {self.model.image_size}")
        return self


# ---- stage 4: evaluation ------------------------------------------------------------------------------------


EVAL_SET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class EvalSet(ConfigModel):
    """One eval set: where it is, the name its metrics are reported under, and optionally its own class names
    and prompt templates. Its layout is found from what is at `uri` (flexi_jest.data.eval_sets)."""

    uri: str = Field(min_length=1, description=(
        "a flexi-jest split, a CLIP_benchmark webdataset root (<uri>/<split>/*.tar, classnames.txt, "
        "zeroshot_classification_templates.txt), a directory of tars (img2dataset), a .tar or brace pattern "
        "of tars, or an ImageFolder (class folders of images); a path, file:// or s3://"))
    name: str | None = Field(None, pattern=EVAL_SET_NAME, description=(
        "reported under this name (metrics '<name>.top1', ...); default: derived from the uri (the split's "
        "dataset, else its folder name), made unique among the call's sets"))
    classnames: str | None = Field(None, description=(
        "file of class names, one a line in label order (CLIP_benchmark's classnames.txt), or a JSON list; "
        "default: the set's own (manifest, classnames.txt beside the data, ImageFolder folder names)"))
    templates: str | None = Field(None, description=(
        "file of prompt templates, one a line, with {c} or {} where the class name goes (CLIP_benchmark's "
        "zeroshot_classification_templates.txt), or a JSON list; default: the set's own, else 'a photo of a {c}.'"))
    layout: Literal["auto", "flexi-jest", "clip_benchmark", "webdataset", "imagefolder"] = Field(
        "auto", description="how to read uri; auto: found from what is there")
    split: str = Field("test", min_length=1, description="CLIP_benchmark root: the folder of the split's tars")

    @classmethod
    def parse(cls, item: "str | dict[str, Any] | EvalSet") -> "EvalSet":
        """An EvalSet from its spec string 'name=uri' or 'uri' (or a dict of fields, or an EvalSet).

        The part before the first '=' is a name only if it looks like one (letters, digits, '_.-', no '/' or
        ':'), so 's3://bucket/k=v' and 'pipe:cmd --a=b' stay whole URIs."""
        if isinstance(item, EvalSet):
            return item
        if isinstance(item, dict):
            return cls.model_validate(item)
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"eval set spec {item!r}: expected 'name=uri', 'uri' or an object with a uri")
        name, sep, uri = item.strip().partition("=")
        if sep and re.match(EVAL_SET_NAME, name) and uri.strip():
            return cls(name=name, uri=uri.strip())
        return cls(uri=item.strip())


class EvaluateConfig(ConfigModel):
    model: str = Field("runs/learner/model.pt", description="model file to evaluate")
    eval_data: list[str | EvalSet] = Field(default_factory=lambda: ["runs/data/eval"], min_length=1, description=(
        "eval sets, each 'name=uri', 'uri' or {uri, name, classnames, templates, ...} (EvalSet); each is "
        "reported under its own name"))
    patch_size: Int | None = Field(None, ge=1, description="image patch size; default the model's base (Flexi: 16)")
    batch_size: Int = Field(256, ge=1)
    max_samples: Int | None = Field(None, ge=1, description="evaluate at most this many samples per split")
    device: Device = "auto"
    out_path: str | None = Field(None, description="write the result JSON here")
    allow_partial: bool = Field(False, description=(
        "score on the readable part of a split with unreadable samples or shards (the shortfall is in the result); "
        "default: such a split fails the evaluation"))
    champion_metric: str | None = Field(None, pattern=r"^.+\.[A-Za-z0-9_]+$", description=(
        "'<eval set name>.<metric>' that promotion compares, e.g. imagenet-val.top1; default: the first eval "
        "set's top1 (its image_to_text_r1 if it has no labels)"))
    data_access: DataAccess = Field(default_factory=DataAccess, description=DATA_ACCESS_DESCRIPTION)

    @field_validator("eval_data")
    @classmethod
    def _check_eval_sets(cls, items: list[Any]) -> list[Any]:
        names = [EvalSet.parse(item).name for item in items]
        repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
        if repeated:
            raise ValueError(f"eval set names must be unique; repeated: {repeated}")
        return items

    @model_validator(mode="after")
    def _check_data_access(self) -> "EvaluateConfig":
        check_data_access(self.data_access, _eval_specs(self.eval_data))
        return self


class SplitMetrics(StrictModel):
    """One eval set's metrics. Classification needs class names and a label per sample, retrieval a caption
    per sample: when either cannot run, its metrics are None and `*_skipped` says why (never a silent None)."""

    uri: str | None = Field(None, description="where the set was read")
    layout: str | None = Field(None, description="flexi-jest, clip_benchmark, webdataset or imagefolder")
    num_samples: int = Field(description="images scored")
    num_classes: int
    num_texts: int = Field(0, description="captions scored (an image may have several)")
    top1: float | None = Field(None, description="zero-shot top-1 accuracy")
    top5: float | None = None
    mean_per_class_recall: float | None = Field(None, description="top-1 recall averaged over the classes present")
    classification_skipped: str | None = Field(None, description="why there is no top1 (no labels, no class names)")
    image_to_text_r1: float | None = None
    image_to_text_r5: float | None = None
    image_to_text_r10: float | None = None
    text_to_image_r1: float | None = None
    text_to_image_r5: float | None = None
    text_to_image_r10: float | None = None
    retrieval_skipped: str | None = Field(None, description="why there is no retrieval (no captions)")
    read_stats: ReadStatsSummary = Field(default_factory=ReadStatsSummary)
    expected_samples: int | None = Field(None, description=(
        "samples the set holds by its own account (a manifest's or img2dataset's *_stats.json counts, an "
        "ImageFolder's images; capped at max_samples); None when unknown"))
    shortfall: int = Field(0, description=(
        "samples not scored: expected_samples - num_samples when known, else the samples skipped one by one"))

    @model_validator(mode="after")
    def _say_why(self) -> "SplitMetrics":
        if (self.top1 is None) == (self.classification_skipped is None):
            raise ValueError("a split has either top1 or classification_skipped (the reason there is none)")
        if (self.image_to_text_r1 is None) == (self.retrieval_skipped is None):
            raise ValueError("a split has either retrieval metrics or retrieval_skipped (the reason there are none)")
        return self


class EvaluateResult(StrictModel):
    model: str
    splits: dict[str, SplitMetrics]
    champion_metric: str | None = Field(None, description="the metric promotion compares ('<set>.<metric>')")
    champion_value: float | None = None


# ---- promotion -------------------------------------------------------------------------------------------------


class ChampionRule(StrictModel):
    """When a new learner version takes `champion` from the current one (registry.promote)."""

    metric: str = Field("", description="the eval metric compared, by name (<split>.<metric>, e.g. shapes.top1); "
                        "'' = the evaluation's champion metric (EvaluateConfig.champion_metric, the pipeline's "
                        "champion_metric), else its headline (top-1 of its first set, else image->text R@1)")
    direction: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better")
    min_margin: Float = Field(0.0, ge=0.0, description="the challenger must beat the champion by more than this")
    allow_partial: bool = Field(False, description=(
        "crown a version whose compared metric was measured on an eval set with unreadable samples (evaluated "
        "with allow_partial; its shortfall > 0). Default: such a version is not crowned, and the reason says why"))


# ---- method presets ---------------------------------------------------------------------------------------------

# The learner config fields each named method sets: the CLI's demo, the benchmark and the pipeline read this one
# table. Patch sizes are the tiny preset's (32 px): patch 8 plays the paper's 16 and patch 16 its 32.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "uniform": {"method": "uniform"},
    "offline-filter": {"method": "offline-filter", "offline_keep_ratio": 0.3},  # DataComp's CLIP-score top 30 %
    "jest": {"method": "joint", "score": "learnability"},
    "flexi-jest": {"method": "joint", "score": "learnability", "scoring_patch_size": 16, "train_patch_sizes": [8, 16]},
    # the offline filter's top 30 % first, then joint learnability on what it kept (a practitioner's combination)
    "filter+jest": {"method": "joint", "score": "learnability", "prefilter_keep_ratio": 0.3},
}


# ---- profiles ---------------------------------------------------------------------------------------------------

PAPER_MODEL = MODEL_PRESETS["vit_b16"].model_dump()

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {},
    "paper": {
        "make-data": {"image_size": 224, "samples_per_shard": 10000},
        "train-reference": {"model": PAPER_MODEL, "batch_size": 32768, "steps": 20000, "train_patch_sizes": [16],
                            "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 2000}},
        "cache-reference": {"batch_size": 4096},
        "train-learner": {"model": PAPER_MODEL, "super_batch_size": 163840, "filter_ratio": 0.8, "n_chunks": 16,
                          "steps": 100000, "scoring_patch_size": 32, "train_patch_sizes": [16, 32],
                          "loss_chunk_size": 4096, "optim": {"lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 5000}},
        "evaluate": {"patch_size": 16, "batch_size": 1024},
    },
}

STAGE_CONFIGS: dict[str, type[StrictModel]] = {
    "make-data": MakeDataConfig,
    "train-reference": TrainReferenceConfig,
    "cache-reference": CacheReferenceConfig,
    "train-learner": TrainLearnerConfig,
    "evaluate": EvaluateConfig,
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge override into a copy of base (nested dicts merge, everything else replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def stage_config(stage: str, profile: str = "tiny", values: dict[str, Any] | None = None) -> StrictModel:
    """Build and validate the config of `stage`: the profile's overrides, then `values` on top."""
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_CONFIGS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    merged = deep_merge(PROFILES[profile].get(stage, {}), values or {})
    return STAGE_CONFIGS[stage].model_validate(merged)


FIELD_FIRST = re.compile(r"(?P<field>[a-z_][a-z0-9_.]*): (?P<rest>.*)", re.S)


def format_validation_error(stage: str, error: ValidationError) -> str:
    """A readable message naming every bad field, its problem and the value given."""
    lines = [f"invalid config for {stage}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"]
        if not where:  # a check across fields; its message starts with the field it blames ("n_chunks: ...")
            named = FIELD_FIRST.match(message.removeprefix("Value error, "))
            where, message = (named["field"], named["rest"]) if named else ("(config)", message)
        got = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"  {where}: {message}{got}")
    return "\n".join(lines)


class ConfigError(ValueError, BadInput):
    """A stage config failed validation; the message names the fields."""


def validated_stage_config(stage: str, profile: str, values: dict[str, Any]) -> StrictModel:
    """stage_config, with a validation failure turned into a ConfigError that names the bad fields."""
    try:
        return stage_config(stage, profile, values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(stage, exc)) from None
