"""The config's sections: one typed dataclass per component, with its defaults, choices and ranges.

Each component takes its own section (``build_backbone(cfg.model, ...)``), never the whole ``Config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from softcpt_dist.config.fields import fraction, non_negative, one_of, positive
from softcpt_dist.config.micro import MicroGroupConfig, MicroPretrainConfig


# The methods of the official SoftCPT code, whose precision modes model.precision=official_* reproduce (and
# zero-shot CLIP, which learns nothing and is evaluated beside them).
OFFICIAL_PRECISION_METHODS = ("softcpt", "coop", "zeroshot")


@dataclass
class ModelConfig:
    arch: str = "softcpt-tiny"  # any open_clip architecture name, e.g. RN50, ViT-B-16, ViT-L-14
    # open_clip pretrained tag (e.g. "openai"), a local weights file, micro (the micro CLIP, pre-trained here on
    # first use: model.micro), or null for random init.
    pretrained: Optional[str] = None
    # fp32 | bf16 | fp16: the frozen CLIP's weights and compute; learnable tensors, logits and loss stay fp32.
    # official_fp16: the official code's PREC=fp16 (its scripts' default): CLIP converted as OpenAI's (fp16
    # linear, convolution and attention weights, layer norms computed in fp32), learnable contexts fp16 and
    # updated in fp16 (no fp32 copy), the meta network's fp32 weight applied in fp16, logits and loss in fp16;
    # official_amp: the official code's PREC=amp: fp32 CLIP and contexts, forward and loss under fp16 autocast,
    # dynamic loss scaling (torch.amp.GradScaler's rules), one optimizer step per batch.
    # Both official modes: method.name=softcpt or coop, engine.zero_stage=0.
    precision: str = one_of("fp32", "bf16", "fp16", "official_fp16", "official_amp")
    device: str = "cpu"  # several ranks on CUDA: each uses cuda:<local rank>
    cache_dir: Optional[str] = None  # where open_clip looks for / stores tagged weights
    # null: QuickGELU when loading OpenAI's original checkpoints, else the architecture's default.
    quick_gelu: Optional[bool] = None
    micro: MicroPretrainConfig = field(default_factory=MicroPretrainConfig)  # model.pretrained=micro


@dataclass
class PromptConfig:
    n_ctx: int = positive(16)  # N: context vectors per class prompt
    n_task_ctx: int = non_negative(4)  # M: learnable task-context vectors in the task prompt (official runs: 4)
    n_class_ctx: int = non_negative(4)  # K: learnable class-context vectors of the class-aware variants
    class_token_position: str = one_of("end", "middle", "front")  # front/middle: CoOp's placements
    # The same placements for SoftCPT's task prompt (official TASK_TOKEN_POSITION) and the class-feature prompt
    # of the class-aware variants (official CLASS_TOKEN_POSITION)
    task_token_position: str = one_of("end", "middle", "front")
    class_feature_token_position: str = one_of("end", "middle", "front")
    init_std: float = 0.02  # std of the normal init of every learnable context
    # Contexts initialised from the token embeddings of words instead (e.g. "a photo of a"; "_" reads as a
    # space), every context row the same phrase; its token count must equal the context's count:
    ctx_init: Optional[str] = None  # CoOp's context, n_ctx tokens (official CTX_INIT)
    task_ctx_init: Optional[str] = None  # SoftCPT's task context, n_task_ctx tokens (official TASK_CTX_INIT)
    class_ctx_init: Optional[str] = None  # SoftCPT CA/CS class context, n_class_ctx tokens (CLASS_CTX_INIT)


@dataclass
class TextConfig:
    """How class and task prompts go through the frozen text encoder; both paths are exact."""

    # shared_prefix: each shared leading run of prompt positions encoded once, the rest packed without
    # padding | dense: every prompt padded to the longest (the reference)
    path: str = one_of("shared_prefix", "dense")
    # auto: with more than one rank, each rank encodes a share of the classes and the features are
    # all-gathered (exact) | off: every rank encodes every class
    shard: str = one_of("auto", "off")
    # With shard on, how a training step scores: shares: every rank scores the global batch against its own
    # classes (image features and per-sample softmax statistics are exchanged, class features never) |
    # gathered: the class features are all-gathered and their gradients reduced back (PLOT, whose scores read
    # per-position image features, always scores so)
    scoring: str = one_of("shares", "gathered")
    # true: attention over whole blocks of 16 keys and >= 4 queries, so that a class's feature is bitwise
    # the same whichever classes it is encoded with (ranks' shares, task-grouped batches) | false: no such
    # padding (faster text side on CPU; features then differ across shardings by fp32 rounding)
    batch_invariant: bool = True


@dataclass
class KernelsConfig:
    """The fused Triton kernels (``softcpt_dist.kernels``): exact within fp32 rounding of the torch path."""

    # auto: Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1) for prompt assembly and attention
    # on the shared-prefix text path and the cosine-logit cross-entropy; the torch path elsewhere | off
    enabled: str = one_of("auto", "off")


@dataclass
class MethodConfig:
    # a registered method (softcpt_dist.model.methods): softcpt | coop | cocoop | kgcoop | prograd | plot | zeroshot | linear_probe | protonet
    name: str = "softcpt"
    variant: str = one_of("NATA", "NATS", "CATA", "CSTA", "CATS", "CSTS")  # softcpt
    meta_net: str = one_of("lin", "mlp")  # lin (paper: bias-free linear) | mlp (extension, not in the paper)
    meta_hidden: int = 512  # hidden width of the mlp meta network
    # Class-aware variants (CA/CS): what the meta network reads -- the official TRAINER.MTCOOP.PG_TYPE.
    # concat: [class feature, task feature] (lin, the paper) | mean: their mean (linmean) | class: the class
    # feature only (lincls; the variant then has no task prompt)
    meta_input: str = one_of("concat", "mean", "class")
    # Class-aware variants: the class context keeps its (seeded) initial value, is not trained and not saved
    # (the official TRAINER.MTCOOP.FREEZE_CLS_PROMPT)
    freeze_class_context: bool = False
    # Class-aware variants: each training step encodes and scores, per task of the batch, the classes some
    # sample of the batch belongs to plus ceil(rate x the others) random ones (0: all classes; evaluation
    # always uses all) -- the official TRAINER.MTCOOP.CLS_SAMPLE_RATE (0.1 in the General-10 CA/CS runs)
    class_sample_rate: float = fraction(0.0)
    # zeroshot: each task's own template | ensemble: CLIP's 7 selected ImageNet templates + the task's own, features
    # averaged (the official ZeroshotCLIP2)
    zeroshot_templates: str = one_of("task", "ensemble")
    kg_weight: float = 8.0  # kgcoop: weight of the hand-crafted-feature penalty (the official W; 8.0 as published)
    # prograd: the projection's strength λ and the distillation temperature T (the official LOSS.LAMBDA, LOSS.T)
    prograd_lambda: float = 1.0
    prograd_temperature: float = 1.0
    # plot: prompts per class (the official TRAINER.PLOT.N), each of prompt.n_ctx vectors; 2 x 16 gives the paper's
    # 163,840 learnable elements for RN50 on General-10
    plot_prompts: int = positive(2)
    coop_mode: str = one_of("CA", "CS", "MT")  # coop: one context per task | per class | one for all tasks
    # Linear probe: inverse L2 strengths searched on the validation split (CoOp's lpclip grid).
    lp_c_grid: List[float] = field(default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6])
    lp_search_steps: int = 8  # log-scale refinement steps around the best grid value
    lp_max_iter: int = 1000


@dataclass
class SyntheticDataConfig:
    train_per_class: int = 24
    val_per_class: int = 4
    test_per_class: int = 12
    image_size: int = 64
    seed: int = 0


@dataclass
class SamplerConfig:
    mode: str = one_of("union", "balanced", "temperature")  # union: the paper (uniform over all samples)
    temperature: float = positive(2.0)  # temperature mode: task probability proportional to n_t ** (1/T)
    tasks_per_batch: int = non_negative(0)  # > 0: each micro-batch holds samples of at most this many tasks


@dataclass
class FeatureCacheConfig:
    enabled: bool = False  # precompute frozen image features; training/eval skip the image encoder
    dir: str = "cache/features"  # shared by runs; entries are keyed by model, weights and preprocessing
    train_views: int = non_negative(0)  # augmented views per training image to cache (0: training reads images)
    batch_size: int = positive(128)


@dataclass
class DataConfig:
    # synthetic | micro | task_folders | general10 | plant6 | fashion20 | split_dk | custom
    # (see softcpt_dist.data.loading)
    dataset: str = "synthetic"
    root: str = "data/synthetic"
    group_file: Optional[str] = None  # custom: YAML task group; split_dk: the split_dk_*.json file
    # general10/plant6: auto (split_dk if present, else split_zhou) | split_dk | split_zhou
    split_format: str = one_of("auto", "split_dk", "split_zhou")
    tasks: Optional[List[str]] = None  # keep only these tasks (keys or names), in this order
    shots: int = non_negative(16)  # K images per class from train (0 = all); validation keeps min(K, 4)
    fewshot_seed: Optional[int] = None  # null: train.seed
    # seeded: this project's per-class draw | official: the official split_fewshot_mt/shot_K-seed_S.pkl of each
    # general10 / plant6 dataset (seed: data.fewshot_seed or train.seed), read without running code
    fewshot_source: str = one_of("seeded", "official")
    # Base-to-new and unseen tasks (the official DATASET.SUBSAMPLE_CLASSES / SUBSAMPLE_TASKS): all | base (the
    # first ceil(n/2) classes of each task / tasks of the group) | new (the rest), renumbered from 0
    subsample_classes: str = one_of("all", "base", "new")
    subsample_tasks: str = one_of("all", "base", "new")
    train_augment: str = one_of("paper", "none")  # paper: random resized crop 0.08-1, bicubic, flip
    num_workers: int = 0
    skip_bad_images: bool = False  # true: decode every used image first, drop and report unreadable ones
    generate_if_missing: bool = True  # built-in synthetic and micro data only
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    micro: MicroGroupConfig = field(default_factory=MicroGroupConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)


@dataclass
class OptimConfig:
    name: str = one_of("sgd", "adamw")
    lr: float = non_negative(0.002)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = positive(50)
    batch_size: int = positive(32)
    schedule: str = one_of("cosine", "constant")
    warmup_epochs: int = non_negative(1)
    warmup_type: str = one_of("constant", "linear")
    warmup_lr: float = 1e-5
    # Reproduce the official code: its optimizer and scheduler are registered once per module
    # name and stepped once per name (3 per iteration for NA variants, 4 for CA/CS).
    official_stepping: bool = False


@dataclass
class EngineConfig:
    """DeepSpeed engine. ``optim.batch_size`` is the global batch: each rank's micro-batch is
    ``batch_size / (world_size * grad_accum_steps)``, so results do not depend on the world size."""

    zero_stage: int = one_of(0, 1, 2, 3)  # 3 partitions the frozen CLIP weights across ranks too
    grad_accum_steps: int = positive(1)
    grad_clip: float = non_negative(0.0)  # max global gradient norm; 0 = off
    activation_checkpointing: bool = False  # recompute text-encoder blocks in backward (exact)
    backend: str = one_of("auto", "nccl", "gloo")  # auto: nccl on cuda, gloo on cpu
    # How ranks exchange the learnable gradients under ZeRO-0: structured: the meta network's weight by its
    # factors (rows of its input and output gradients), the rest in one all-reduce | deepspeed: DeepSpeed
    # all-reduces every tensor. ZeRO-1/2/3 always use DeepSpeed's; so does ProGrad.
    gradient_exchange: str = one_of("structured", "deepspeed")
    timeout_s: float = positive(300.0)  # bound on every collective: a dead rank makes the others exit
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config keys, merged last


@dataclass
class TrainConfig:
    seed: int = 1
    mode: str = one_of("auto", "joint", "per_task")  # auto: the method's own (per_task for CoOp CA/CS)
    task_weights: Optional[Dict[str, float]] = None  # per-task loss weights by task name
    log_every: int = positive(10)  # iterations between log lines
    eval_batch_size: int = positive(100)
    eval_split: str = one_of("test", "val")
    # also score zero-shot CLIP (each task's template) on eval_split: logged beside the run's scores, and
    # kept in results.json under "zero_shot"
    compare_zeroshot: bool = False
    output_dir: str = "runs"
    run_name: Optional[str] = None  # null: <method>-<variant>-<timestamp>
    deterministic: bool = True
    progress: bool = True  # tqdm bars on interactive terminals
    resume: Optional[str] = None  # null | latest (this run folder's newest checkpoint) | a checkpoint folder
    checkpoint_every: int = non_negative(0)  # steps between training checkpoints (0: at the end of every epoch only)
    keep_checkpoints: int = positive(2)  # newest N training checkpoints kept
    on_nonfinite: str = one_of("stop", "skip")  # what a NaN/inf loss does
    # Signals that make a run save a checkpoint and exit 75 (names without SIG). Some NCCL versions take
    # over SIGUSR1, which is why submitit warns with USR2: use [USR2, TERM] and sbatch --signal=B:USR2@90.
    stop_signals: List[str] = field(default_factory=lambda: ["USR1", "TERM"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    text: TextConfig = field(default_factory=TextConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
