r"""Linear probe of a pretrained encoder (frozen), FAIR's protocol or the CRATE-MAE paper's.

    python -m crate_jax.main --config=configs/linear_probe.py:dataset=cifar10 --config.init_from=DIR --workdir=OUT
    python -m crate_jax.main --config=configs/linear_probe.py:dataset=cifar10,protocol=logistic \
        --config.init_from=DIR --workdir=OUT
    python -m crate_jax.main --config=configs/linear_probe.py:dataset=embedded --config.init_from=/tmp/crate_demo \
        --workdir=/tmp/probe                                                    # this machine, ~2 min

Arguments (comma-separated): dataset=imagenet2012|cifar10|cifar100|oxford_flowers102|
oxford_iiit_pet|embedded (default imagenet2012), protocol=fair|logistic, runlocal (a few CPU
steps). `init_from` is a pretraining workdir or checkpoint, or an import_torch output: its
stored spec rebuilds the model; `model.*` here only changes image_size, dtype and layout.
`random_init=True` probes the same architecture with random weights (a baseline).

fair (FAIR MAE `main_linprobe.py`): cls feature after the final norm, BatchNorm without
affine (eps 1e-6) + Dense (init std 0.01), LARS lr 0.1 x batch/256, momentum 0.9, weight
decay 0, warmup + cosine; ImageNet: batch 16384, 90 epochs, 10 warmup, RandomResizedCrop +
flip. Transfer sets: 224 px, batch 512, 100 epochs, 10 warmup. Logs eval_accuracy.
Expected cost per image: one encoder forward, nothing flows back through the frozen encoder:
for CRATE-MAE-B at 224 about 6.3 GMACs (12 layers x 197 tokens), a sixth of a pretraining
step's 3 x 12.6 GMACs; ImageNet's 90 epochs cost about 90 x 1.28M x 12.6 GFLOPs = 1.5e18 FLOPs.
logistic (the paper): features of both splits once (eval transform), full-batch L-BFGS
logistic regression, L2 strength from l2_grid chosen on a held-out 20% of the training split;
writes WORKDIR/linear_probe_logistic.json.
"""

import math

import ml_collections

# name -> (TFDS name, train split, eval split, classes, train examples). Flowers-102 trains on
# train + validation (1020 + 1020), the usual transfer protocol.
DATASETS = {
    "imagenet2012": ("imagenet2012", "train", "validation", 1000, 1_281_167),
    "cifar10": ("cifar10", "train", "test", 10, 50_000),
    "cifar100": ("cifar100", "train", "test", 100, 50_000),
    "oxford_flowers102": ("oxford_flowers102", "train+validation", "test", 102, 2_040),
    "oxford_iiit_pet": ("oxford_iiit_pet", "train", "test", 37, 3_680),
    "embedded": ("crate_jax_embedded", "probe_train", "probe_test", 16, 1_024),  # 16 photographs
}
EVAL_ALL = 1_000_000  # eval_steps: more batches than any split has, i.e. the whole split


def parse_arg(arg, **defaults):
    """'dataset=cifar10,runlocal' -> dict; a bare word sets a boolean default to True."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
        out[key] = value if sep else True
    if out.get("dataset") not in DATASETS:
        raise ValueError(f"config argument dataset={out.get('dataset')!r} is not one of {sorted(DATASETS)}")
    return out


def steps(epochs: float, examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * examples / batch_size))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, dataset="imagenet2012", protocol="fair", runlocal=False)
    tfds_name, train_split, eval_split, num_classes, train_examples = DATASETS[args["dataset"]]
    imagenet, embedded = args["dataset"] == "imagenet2012", args["dataset"] == "embedded"
    config = ml_collections.ConfigDict()
    config.task = "linear_probe"
    config.protocol = args["protocol"]  # "fair" (LARS, train.fit) or "logistic" (the paper's)
    config.seed = 0
    config.num_classes = num_classes

    config.batch_size = 16384 if imagenet else 128 if embedded else 512  # global
    config.grad_accum_steps = 1
    epochs, warmup_epochs = (90, 10) if imagenet else (50, 5) if embedded else (100, 10)
    config.total_steps = steps(epochs, train_examples, config.batch_size)
    config.log_every_steps = 10 if embedded else 100
    config.eval_every_steps = steps(10, train_examples, config.batch_size)  # every 10 epochs
    config.eval_steps = EVAL_ALL
    config.eval_batch_size = 256 if embedded else 1024
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    config.init_from = ""  # a pretraining workdir / checkpoint / import_torch output, or a classifier (its head too)
    config.random_init = False  # True: init_from's architecture with random weights (a baseline)
    config.matmul_precision = "default"
    config.peak_flops_per_device = 0.0
    config.profile_steps = 0
    config.hang_timeout_s = 1800.0  # no finished step / eval batch / phase heartbeat for this long: log stacks, exit 3
    # A CPU host (single process) as this many JAX devices, data parallel; 0: one per core (at most 8)
    # that divides the batches; 1: JAX's default. XLA_FLAGS' device count wins (cluster.split_cpu_host).
    config.cpu_devices = 0

    config.mesh = ml_collections.ConfigDict(dict(slices=1, data=-1, fsdp=1, tensor=1))
    # Mesh axes the optimizer's moments and update are split over beyond the parameters' own
    # sharding, e.g. ("data",) (weight-update sharding, sharding.update_shardings: less memory and
    # AdamW traffic per chip, one all-gather of the fp32 parameters per step); () = as the params.
    config.mesh.update_sharding = ()
    config.axis_rules = [
        ("act_batch", ("slices", "data", "fsdp")),
        ("act_length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("patch", None),
        ("layers", None),
    ]

    # With init_from, the checkpoint names the model; these keys go on top of its spec.
    config.model = ml_collections.ConfigDict()
    config.model.name = "crate_mae_base"  # the preset when init_from is empty
    config.model.image_size = 64 if embedded else 224  # the demo pretrains at 64 px (configs/demo.py)
    config.model.dtype = "float32" if embedded else "bfloat16"
    config.model.param_dtype = "float32"
    config.model.scan_layers = not embedded
    config.model.remat = "none"

    config.head = ml_collections.ConfigDict()
    config.head.pool = "cls"  # "cls" or "mean" (of the patch tokens); logistic also takes "pixels"
    config.head.init_std = 0.01

    config.data = ml_collections.ConfigDict()
    config.data.name = tfds_name
    config.data.backend = "grain"  # grain (TFDS array_record) | tfrecord (tf.data, reads gs://) | image_folder
    config.data.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.split = train_split
    config.data.eval_split = eval_split
    config.data.transform = "linprobe_train"  # RandomResizedCrop(0.08-1) + flip; logistic uses eval_transform
    config.data.eval_transform = "eval"
    config.data.shuffle = True
    config.data.worker_count = 0 if embedded else 16
    config.data.prefetch = 4

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "lars"
    # x batch_size / 256. LARS moves each matrix by about lr x trust_coefficient of its norm per
    # step: FAIR's 0.1 is tuned for ImageNet's 7,000 steps of 16,384. The embedded set's 450
    # steps of 128 reached 14% / 76% / 83% top-1 with 0.1 / 8 / 32 (demo checkpoint).
    config.optim.base_lr = 32.0 if embedded else 0.1
    config.optim.warmup_steps = steps(warmup_epochs, train_examples, config.batch_size)
    config.optim.end_lr = 0.0
    config.optim.momentum = 0.9
    config.optim.weight_decay = 0.0
    config.optim.trust_coefficient = 0.001

    config.logistic = ml_collections.ConfigDict()
    config.logistic.l2_grid = [10.0**e for e in range(-6, 2)]  # of mean CE + l2/2 |W|^2
    config.logistic.holdout_fraction = 0.2
    config.logistic.max_iters = 1000
    config.logistic.tol = 1e-5

    if args["runlocal"]:
        config.batch_size = 16
        config.total_steps = 4
        config.log_every_steps = 2
        config.eval_every_steps = 4
        config.eval_steps = 1
        config.eval_batch_size = 16
        config.checkpoint_every_steps = 2
        config.optim.warmup_steps = 1
        config.model.name = "crate_mae_tiny"
        config.model.image_size = 32
        config.model.dtype = "float32"
        config.model.scan_layers = False
        config.data.worker_count = 0
        config.data.prefetch = 2
        config.logistic.max_iters = 100
    return config
