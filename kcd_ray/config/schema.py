"""The typed config's sections: one dataclass per top-level key of a config YAML.

Every field is declared with ``_f`` (default, choices, bounds, help); ``kcd_ray.config.build`` checks them when
a config is built, and ``kcd-ray config --list`` prints them. Sections that registered parts extend (the
selection strategies' ``selection.<name>``) are :class:`~kcd_ray.config.fields.OpenSection` s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kcd_ray.config.fields import OpenSection, _f, extensions_field


@dataclass
class SyntheticConfig:
    num_train: int = _f(2000, ge=1, help="training samples")
    num_test: int = _f(500, ge=1, help="test samples")
    num_classes: int = _f(10, ge=2)
    image_size: int = _f(32, ge=4)
    duplicate_fraction: float = _f(0.0, ge=0.0, lt=1.0,
                                   help="share of train samples that are near-copies of a few easy prototypes")
    noise: float = _f(0.35, ge=0.0, help="pixel noise of the hard samples, in units of the class-pattern contrast")
    seed: int = 0


@dataclass
class DataConfig:
    name: str = _f("digits", choices="datasets", help="registered dataset: digits, synthetic, cifar10, cifar100, "
                                                      "folder, idx (MNIST-style IDX files), fashion_mnist")
    root: str = _f("~/.cache/kcd_ray/data", help="folder holding the prepared Parquet data sets")
    source: str = _f("", help="raw source folder: the CIFAR pickle folder; an image folder with train/ and test/ or "
                              "val/; idx: the folder of the four MNIST-style IDX files (train-images-idx3-ubyte, "
                              "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each may be "
                              ".gz); fashion_mnist: empty = /usr/share/datasets/fashion-mnist (`apt-get install "
                              "dataset-fashion-mnist`)")
    image_size: int = _f(32, ge=8, help="digits: resize 8x8 handwriting to this size; folder: eval/crop size; "
                                        "idx/fashion_mnist: 28x28 kept at 28, zero-padded to 29..32 (28 -> 32: 2 px a "
                                        "side, the CIFAR-style recipe), bilinearly resized to any other size")
    channels: int = _f(0, choices=(0, 1, 3), help="grey sources (idx, fashion_mnist, digits): 3 replicates the grey "
                                                  "level (every zoo model takes 3), 1 keeps one channel (models with a "
                                                  "1-channel input only), 0 = auto = 3; colour sources take 0 or 3")
    train_subset: int = _f(0, ge=0, help="prepare a class-stratified, seeded subset of this many training rows "
                                         "(any source; the test split stays whole; part of the prepared folder's "
                                         "name and recorded in meta.json); 0 = the whole training split")
    train_subset_seed: int = _f(0, ge=0, help="seed of data.train_subset's draw")
    val_fraction: float = _f(0.0, ge=0.0, lt=1.0, help="a class-stratified validation split of this share of the "
                                                       "training split, carved out once at preparation (its own "
                                                       "Parquet split; training, the E-step, the teacher cache and "
                                                       "every strategy see only the rest); sweeps and run.select "
                                                       "choose on it; 0 = none")
    val_seed: int = _f(0, ge=0, help="seed of data.val_fraction's draw (recorded in meta.json)")
    augment: str = _f("auto", choices=("auto", "cifar", "imagenet", "none"),
                      help="auto picks cifar for <=64px, imagenet above")
    download: bool = _f(False, help="CIFAR: let torchvision fetch the archive when the folder is missing")
    shuffle: str = _f("auto", choices=("auto", "full", "block_local", "block_local_files"),
                      help="per-epoch row order: full (= auto) a uniform permutation of the kept set seeded by (seed, "
                           "epoch); block_local: rows mixed only inside 1024-row blocks, file and block order "
                           "reshuffled (block order up to 2 GiB); block_local_files: the same without block order")
    shuffle_buffer: int = _f(0, ge=0,
                             help="rows of an extra consumer-side shuffle buffer per worker (costs trainer CPU)")
    augment_on: str = _f("auto", choices=("auto", "worker", "split", "pipeline"),
                         help="where training augmentation runs: worker (uint8 rows cross Ray Data, crop/flip and "
                              "normalisation on the worker's device), split (the pixel-exact crop/flip in Ray Data's "
                              "tasks, normalisation on the worker), pipeline (all in Ray Data's tasks, float rows); "
                              "auto = worker on GPU workers, split on CPU workers (measured faster there)")
    synthetic: SyntheticConfig = _f(factory=SyntheticConfig)


@dataclass
class OptimConfig:
    epochs: int = _f(30, ge=1)
    batch_size: int = _f(64, ge=1, help="per-worker batch size")
    lr: float = _f(0.05, gt=0.0)
    momentum: float = _f(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _f(5e-4, ge=0.0)
    nesterov: bool = False
    scheduler: str = _f("multistep", choices=("multistep", "cosine", "constant"))
    milestones: list[int] = _f(factory=lambda: [150, 180, 210], help="multistep epochs (per epoch, never per step)")
    lr_decay: float = _f(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = _f(0, ge=0, help="linear LR warm-up epochs")
    amp: bool = _f(False, help="mixed precision on GPU (bf16 if supported, else fp16 with a grad scaler)")
    channels_last: bool = _f(False, help="GPU: channels-last memory format for the models and the batches")
    seed: int = 0
    eval_every: int = _f(1, ge=1)
    eval_batch_size: int = _f(256, ge=1)
    threads: int = _f(0, ge=0, help="torch threads per worker; 0 = the worker's CPU share, rounded up")


@dataclass
class ScalingConfig:
    num_workers: int = _f(1, ge=0, help="Ray Train workers; 0 runs the loop in-process")
    cpus_per_worker: float = _f(1.0, gt=0.0)
    use_gpu: str = _f("auto", choices=("auto", "true", "false"))
    gpus_per_worker: float = _f(1.0, gt=0.0)
    placement_strategy: str = _f("PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    data_cpus: float = _f(0.25, gt=0.0, help="CPUs reserved per Ray Data task (decode/augment)")
    min_workers: int = _f(0, ge=0, help="elastic: below num_workers, the run may go on (and start) with as few as "
                                       "this many workers, growing back to num_workers (Ray Train's elastic "
                                       "ScalingConfig); the global batch optim.batch_size x num_workers stays; "
                                       "0 = fixed")
    resize_interval_s: float = _f(60.0, gt=0.0, help="elastic: how often Ray Train considers resizing a healthy run")


@dataclass
class RunConfig:
    name: str = _f("", help="run name; re-running with the same name resumes. Empty: derived from the config")
    storage_path: str = _f("./runs", help="where run folders go; shared storage (NFS, s3://, gs://) on a cluster")
    max_failures: int = _f(0, ge=-1, help="worker-group restarts from the last checkpoint; -1 = unlimited")
    checkpoints_to_keep: int = _f(2, ge=1)
    ray_address: str = _f("", help="'' = embedded local Ray (or RAY_ADDRESS); 'auto' = attach to a running cluster")
    num_cpus: int = _f(0, ge=0, help="local Ray only: CPUs to give it (0 = all)")
    verbose: int = _f(1, ge=0, le=2)
    resume: str = _f("auto", choices=("auto", "force", "never"),
                     help="re-running a run name: auto resumes if the config matches (run.*, scaling.*, "
                          "optim.epochs may change), force resumes with any change, never starts afresh (the old "
                          "folder is moved aside)")
    select: str = _f("auto", choices=("auto", "val_top1", "val_top5", "val_loss", "top1", "top5", "test_loss"),
                     help="the per-epoch metric that picks the best epoch (best_model.pt, summary.json's "
                          "selected_*): auto = val_top1 with a validation split (data.val_fraction), else top1 "
                          "(the test split: the summary then says selected_on_test)")
    trackers: list[str] = _f(factory=list, choices=("tensorboard", "mlflow"),
                             help="experiment trackers rank 0 logs to (pip install 'kcd_ray[tracking]'): tensorboard "
                                  "(events in <run folder>/tensorboard), mlflow (metrics, config, artifacts)")
    tracking_uri: str = _f("", help="MLflow tracking URI (sqlite:///..., http://server:5000, databricks); '' = "
                                    "sqlite:///<run folder>/mlflow.db, for a sweep's trials <sweep folder>/mlflow.db")
    experiment: str = _f("", help="MLflow experiment; '' = the sweep's name for a sweep's trials, else kcd_ray")
    sweep: str = _f("", help="set by `kcd-ray sweep` on each trial: the sweep's name (trackers group trials by it)")
    plugins: list[str] = _f(factory=list, help="modules imported before the config is read, in every process that "
                                               "reads it (the driver, sweep trials, Train workers): where a user's "
                                               "registered strategies, distillers, curricula or hooks live; each must "
                                               "be importable on every node")


@dataclass
class TemperatureConfig:
    schedule: str = _f("constant", choices="temperatures", help="constant, linear, cosine, step, exponential, or ctkd: "
                                                                "a learned global temperature (Curriculum Temperature "
                                                                "KD, Li et al. AAAI 2023), trained by the student's "
                                                                "optimiser through a gradient reversal layer")
    T: float = _f(4.0, gt=0.0, help="start (or constant) temperature (ctkd: unused)")
    T_end: float = _f(4.0, gt=0.0, help="final temperature for linear/cosine/exponential")
    milestones: list[int] = _f(factory=list, help="step: epochs at which T changes")
    values: list[float] = _f(factory=list, help="step: T after each milestone")
    ctkd_T_min: float = _f(1.0, gt=0.0, help="ctkd: T = ctkd_T_min + ctkd_T_span * sigmoid(theta) (the reference's "
                                             "--t_start 1)")
    ctkd_T_span: float = _f(20.0, gt=0.0, help="ctkd: the range of T above ctkd_T_min (the reference's --t_end 20)")
    ctkd_init: float = _f(1.0, help="ctkd: theta's start (the reference's torch.ones(1): T = 1 + 20 sigmoid(1) = 15.6)")
    ctkd_lambda_start: float = _f(0.0, ge=0.0, help="ctkd: gradient-reversal strength at the start of the ramp "
                                                    "(the reference's --decay_max 0, negated)")
    ctkd_lambda_end: float = _f(1.0, ge=0.0, help="ctkd: gradient-reversal strength after the ramp (the reference's "
                                                  "--decay_min -1, negated)")
    ctkd_ramp_epochs: int = _f(10, ge=0, help="ctkd: epochs of the cosine ramp of the reversal strength from "
                                              "ctkd_lambda_start to ctkd_lambda_end (the reference's --decay_loops 10)")


@dataclass
class DistillConfig:
    method: str = _f("kd", choices="distillers", help="registered distiller")
    teacher: str = _f("", help="teacher checkpoint (kcd_ray or RepDistiller format)")
    teacher_model: str = _f("", choices="models", help="teacher architecture (a zoo name, torchvision/<name> or "
                                                      "package.module:callable), needed for RepDistiller checkpoints "
                                                      "and plain state dicts; kcd_ray checkpoints record it")
    teacher_kwargs: dict = _f(factory=dict, help="constructor arguments of a torchvision or factory teacher (e.g. "
                                                 "image_size for ViT); kcd_ray checkpoints record them")
    student_taps: list[str] = _f(factory=list, help="feature methods, torchvision/factory student: graph nodes giving "
                                                    "feats[:-1] (`kcd-ray models --nodes NAME`); empty = its family's "
                                                    "stage outputs. The pooled pre-logit vector is appended")
    teacher_taps: list[str] = _f(factory=list, help="the same for the teacher")
    gamma: float = _f(0.1, ge=0.0, help="weight of cross-entropy with the hard label")
    alpha: float = _f(0.9, ge=0.0, help="weight of the KD term")
    logit_standardize: bool = _f(False, help="z-score each sample's student and teacher logits (over the classes) "
                                             "before the temperature softmax (Sun et al., CVPR 2024): in the KD term "
                                             "(kd and every method's KD term, mtkd) and in dkd's term; not in KCD's "
                                             "values. The reference pairs it with T 2 and a KD weight 9 (kd: alpha 9; "
                                             "dkd: dkd_alpha 9, dkd_beta 72)")
    beta: Optional[float] = _f(None, help="weight of the method's own term; None = the method's default")
    temperature: TemperatureConfig = _f(factory=TemperatureConfig)
    options: dict = _f(factory=dict, help="method-specific options (e.g. feat_dim, nce_k)")
    init_epochs: int = _f(30, ge=0, help="initialisation stage for AB, FT and FSP")
    teachers: list[str] = _f(factory=list, help="mtkd: full-label teacher checkpoints (equal-weight mean of their KD "
                                                "losses); teacher_model names their architecture for RepDistiller "
                                                "files")
    cache: str = _f("off", choices=("off", "exact", "views"), help="teacher-output cache: exact (the teacher's output "
                                                                   "on every epoch's augmented view), views (K seeded "
                                                                   "views per sample, FKD-style) or off (teacher in "
                                                                   "the loop)")
    cache_views: int = _f(8, ge=1, help="views mode: K views per sample (K x N teacher forwards in all)")
    cache_topk: int = _f(0, ge=0, help="0: every logit in fp16; k > 0: the k largest logits and the rest's mass (FKD)")
    cache_dir: str = _f("", help="the cache folder, a path or an object-store URI; empty = "
                                 "<data set>/teacher_cache/<key> (in the data set's store when data.root is one; "
                                 "shared by runs and trials)")


@dataclass
class CurriculumConfig:
    """Class groups and education distillation (docs/methods/ed.md): grades of classes, a growing student, one
    teacher per group."""

    name: str = _f("none", choices="curricula", help="ed: education distillation (distill.method=ed); none: a fixed "
                                                         "student (only_groups still restricts the classes)")
    groups: int = _f(3, ge=1, help="G, the number of class groups (grades)")
    group_sizes: list[int] = _f(factory=list, help="explicit group sizes summing to the number of classes; empty = "
                                                   "floor(K/G) each, the remainder to the last (CIFAR-100: 33/33/34)")
    class_order: str = _f("identity", choices=("identity", "permuted"), help="groups of contiguous label ids, or of "
                                                                             "a permutation seeded by curriculum.seed")
    seed: int = _f(0, help="seed of the permuted class order")
    only_groups: list[int] = _f(factory=list, help="train and evaluate on these groups' classes only (1-based; a "
                                                   "group teacher's run); empty = every class")
    labels: str = _f("global", choices=("global", "local"), help="with only_groups: local labels (position within "
                                                                 "the chosen groups, y - o_g for one group) and that "
                                                                 "many outputs, or the global labels")
    grade_epochs: list[int] = _f(factory=lambda: [149, 30, 61],
                                 help="epochs of each grade; they sum to optim.epochs "
                                      "(docs/methods/ed.md §7: grades change at the first milestones)")
    lr_mode: str = _f("global", choices=("global", "per_grade"),
                      help="global: optim's schedule runs through the grades; per_grade (flagged): restart at "
                           "optim.lr each grade, x lr_decay at 62.5/75/87.5% of it")
    alpha: float = _f(0.3, ge=0.0, le=1.0, help="ed loss: alpha * CE over the K_g logits + (1 - alpha) * T^2 * KL to "
                                                "the sample's group teacher (T: distill.temperature)")
    mix_groups: bool = _f(False, help="true: batches mix the active groups, each sample routed to its group's "
                                      "teacher (what the Ray Data pipeline runs); false: sequential passes over "
                                      "D_1..D_g per epoch (ED's code; in-process feeds only)")
    teacher_source: str = _f("per_group", choices=("per_group", "sliced"), help="per_group: one teacher per group "
                                                                               "(local labels, n_g outputs); sliced "
                                                                               "(deviation): distill.teacher's logit "
                                                                               "slice of each group")
    teachers: list[str] = _f(factory=list, help="per_group: the G group teachers' checkpoints; missing ones are "
                                                "trained first (empty = "
                                                "<run.storage_path>/<derived name>/final_model.pt)")
    teacher_model: str = _f("", choices="models", help="architecture of the group teachers (trained when missing; "
                                                      "RepDistiller files)")
    teacher_epochs: int = _f(0, ge=0, help="epochs of a group teacher's training; 0 = optim.epochs")
    teacher_concurrency: int = _f(0, ge=0, help="group teachers trained at once when missing: 0 = as many as the "
                                                "cluster's free CPUs/GPUs hold, 1 = one after another")
    tr_relu: bool = _f(True, help="ReLU in the teaching-reference heads (docs/methods/ed.md §5.3)")
    tr1_grid: int = _f(1, ge=1, help="pooling grid of the grade-1 head: 1 = global; 4 = the code's resnet20 head")


@dataclass
class KCDConfig:
    enabled: bool = True
    value_fn: str = _f("entropy", choices="value_fns")
    value_T: Optional[float] = _f(None, gt=0.0, help="temperature of the kd value function; None = the distillation "
                                                     "temperature of that epoch")
    mode: str = _f("multiple", choices=("multiple", "single"), help="global history or last epoch only")
    estep: str = _f("online", choices=("online", "offline"))
    lam: float = _f(0.03, ge=0.0, help="frequency-calibration exponent")
    n_ref: float = _f(40.0, gt=0.0)
    interval: int = _f(40, ge=1, help="condense every P epochs")
    warmup: int = _f(0, ge=0, help="no condensation before this epoch")
    rho: float = _f(0.7, gt=0.0, le=1.0, help="final kept ratio")
    stages: int = _f(6, ge=1)
    shape: str = _f("step", choices=("step", "linear", "cosine"),
                    help="step is the paper's fixed decrement (docs/methods/kcd.md §4)")
    summary: bool = _f(True, help="VAKS summary blends; false = pure selection")
    lam_min: float = _f(0.7, ge=0.0, le=1.0)
    offline_batch_size: int = _f(256, ge=1)
    offline_actors: int = _f(1, ge=1)
    seed: int = 0


@dataclass
class SelectionConfig(OpenSection):
    """``selection.<strategy>``: each registered strategy with a ``config_class`` adds its own sub-section
    (``selection.infobatch``, ``selection.unixkd``, ``selection.random``, ...), see ``kcd_ray.engine.selection``."""

    parts = "strategies"
    strategy: str = _f("auto", choices="strategies", help="data selection: auto (kcd if kcd.enabled, else none), "
                                                          "or a registered strategy (kcd-ray config --list "
                                                          "shows each one's section)")
    seed: Optional[int] = _f(None, help="seed of the strategies' per-epoch draws; None = optim.seed")
    budget: Optional[float] = _f(None, gt=0.0, le=1.0, help="the run's target compute as a fraction of plain KD's "
                                                            "FLOPs over the same epochs (the compute ledger's count); "
                                                            "the strategy sets its own parameter from it before "
                                                            "training (kcd: kcd.rho; random: the fraction; infobatch, "
                                                            "unixkd: their ratio); None = as configured")
    budget_key: str = _f("", help="the parameter a budget sets when the strategy has several (kcd: kcd.rho, or "
                                  "kcd.stages to keep rho); '' = the strategy's first")
    teacher_paid: bool = _f(False, help="with a teacher-output cache: count the teacher's forwards as already paid "
                                        "(a cache built once for many runs): compute ratios and budgets then count "
                                        "the student's FLOPs against plain KD's student FLOPs; false: every teacher "
                                        "output a trained row uses costs a teacher forward, cached or not")
    extensions: dict = extensions_field("strategies")


@dataclass
class Config:
    model: str = _f("resnet8x4", choices="models", help="the trained network (student, or teacher in train-teacher): a "
                                                        "zoo name, torchvision/<name> or package.module:callable")
    model_kwargs: dict = _f(factory=dict, help="constructor arguments of a torchvision or factory model (e.g. "
                                               "image_size for ViT); num_classes comes from the data set")
    data: DataConfig = _f(factory=DataConfig)
    optim: OptimConfig = _f(factory=OptimConfig)
    scaling: ScalingConfig = _f(factory=ScalingConfig)
    run: RunConfig = _f(factory=RunConfig)
    distill: DistillConfig = _f(factory=DistillConfig)
    kcd: KCDConfig = _f(factory=KCDConfig)
    curriculum: CurriculumConfig = _f(factory=CurriculumConfig)
    selection: SelectionConfig = _f(factory=SelectionConfig)
