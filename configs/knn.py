r"""Weighted k-NN on frozen features (DINO's `eval_knn.py`): cosine similarity, k = 20,
votes exp(similarity / 0.07); the training split is the bank, the eval split the queries.

    python -m crate_jax.main --config=configs/knn.py:dataset=embedded --config.init_from=/tmp/crate_demo \
        --workdir=/tmp/knn
    python -m crate_jax.main --config=configs/knn.py:dataset=imagenet2012 --config.init_from=DIR --workdir=OUT

Arguments (comma-separated): dataset=imagenet2012|cifar10|cifar100|oxford_flowers102|
oxford_iiit_pet|embedded (default imagenet2012), runlocal. `init_from` as in
configs/linear_probe.py. Writes knn_accuracy / knn_top5_accuracy to WORKDIR/metrics.jsonl
(at the checkpoint's step) and WORKDIR/knn.json. Expected cost: one encoder forward per
image of both splits, then a (queries x bank) similarity; the embedded set takes seconds.
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "linear_probe", os.path.join(os.path.dirname(__file__), "linear_probe.py")
)
linear_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(linear_probe)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = linear_probe.parse_arg(arg, dataset="imagenet2012", runlocal=False)
    tfds_name, train_split, eval_split, num_classes, _ = linear_probe.DATASETS[args["dataset"]]
    embedded = args["dataset"] == "embedded"
    config = ml_collections.ConfigDict()
    config.task = "knn"
    config.seed = 0  # only for random_init
    config.num_classes = num_classes
    config.batch_size = 256 if embedded else 1024  # global, for feature extraction
    config.init_from = ""  # the pretrained model: a training workdir, checkpoint dir or import_torch output
    config.random_init = False  # True: init_from's architecture with random weights (a baseline)
    config.matmul_precision = "default"
    config.hang_timeout_s = 1800.0  # no finished step / eval batch / phase heartbeat for this long: log stacks, exit 3
    # A CPU host (single process) as this many JAX devices, data parallel; 0: one per core (at most 8)
    # that divides the batches; 1: JAX's default. XLA_FLAGS' device count wins (cluster.split_cpu_host).
    config.cpu_devices = 0

    config.mesh = ml_collections.ConfigDict(dict(slices=1, data=-1, fsdp=1, tensor=1))
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

    config.knn = ml_collections.ConfigDict()
    config.knn.k = 20
    config.knn.temperature = 0.07
    config.knn.pool = "cls"  # "cls", "mean" (patch tokens) or "pixels" (a baseline without a model)

    config.data = ml_collections.ConfigDict()
    config.data.name = tfds_name
    config.data.backend = "grain"  # grain (TFDS array_record) | tfrecord (tf.data, reads gs://) | image_folder
    config.data.data_dir = ""  # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.split = train_split  # the bank
    config.data.eval_split = eval_split  # the queries
    config.data.transform = "eval"  # the bank's transform
    config.data.eval_transform = "eval"
    config.data.worker_count = 0 if embedded else 16
    config.data.prefetch = 4

    if args["runlocal"]:
        config.batch_size = 16
        config.model.name = "crate_mae_tiny"
        config.model.image_size = 32
        config.model.dtype = "float32"
        config.model.scan_layers = False
        config.data.worker_count = 0
        config.data.prefetch = 2
    return config
