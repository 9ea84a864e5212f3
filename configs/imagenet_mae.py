r"""CRATE-MAE pretraining on ImageNet-1k with FAIR's MAE recipe.

    python -m crate_jax.main --config=configs/imagenet_mae.py --workdir=gs://BUCKET/crate_mae_base
    python -m crate_jax.main --config=configs/imagenet_mae.py:variant=large --workdir=...
    python -m crate_jax.main --config=configs/imagenet_mae.py:model=mae_vit_base --workdir=...   # FAIR baseline
    python -m crate_jax.main --config=configs/imagenet_mae.py:variant=paper_base --workdir=...  # the paper's options
    python -m crate_jax.main --config=configs/imagenet_mae.py:runlocal --workdir=/tmp/x       # this machine

Arguments (comma-separated): variant=tiny|small|base|large (CRATE-MAE size, default base;
paper_tiny ... paper_large: the paper's CRATE-MAE, `crate_mae_paper_*`),
model=PRESET (e.g. mae_vit_base, or vit_mae_base), runlocal (shrink everything to a few
CPU steps).

Recipe (FAIR MAE, which the CRATE-MAE authors follow): global batch 4096, 800 epochs
(250,228 steps), 40 warmup epochs, AdamW beta (0.9, 0.95), lr 1.5e-4 x batch/256, weight
decay 0.05, cosine to 0, mask ratio 0.75, RandomResizedCrop(224, 0.2-1) + flip.
Expected cost: CRATE-MAE-B is 12.6 GMACs per image forward (all 197 tokens through 24
layers); with the fused ISTA step and TPU's attention the train step is 2.47e14 FLOPs at batch
4096 (`python -m crate_jax.tools.aot_compile --topology=v5e-256`): 4.9 ms at a v5e-256's bf16
peak, though the step is memory-bound there (README, "TPU: attention before and after").
ImageNet must be prepared as a TFDS array_record dataset (see README, "Data").
"""

import ml_collections

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg: str, **defaults):
    """'variant=large,runlocal' -> dict; a bare word sets a boolean default to True."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
        out[key] = value if sep else True
    return out


def model_name(args) -> str:
    if args["model"]:
        name = args["model"]
        return "mae_vit_" + name[len("vit_mae_") :] if name.startswith("vit_mae_") else name
    return f"crate_mae_{args['variant']}"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, variant="base", model="", runlocal=False)
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.seed = 0

    config.batch_size = 4096  # global
    config.grad_accum_steps = 1
    epochs, warmup_epochs = 800, 40
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES / config.batch_size
    config.total_steps = int(epochs * steps_per_epoch)
    config.log_every_steps = 100
    config.eval_every_steps = 5000
    config.eval_steps = 10  # held-out batches per evaluation
    config.eval_batch_size = 1024
    config.num_reconstructions = 8  # images in the PNG grid
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.init_from = ""  # an Orbax checkpoint dir (a training workdir or import_torch output)
    config.matmul_precision = "default"
    config.peak_flops_per_device = 0.0  # set to report MFU (e.g. 1.97e14 for a v5e chip, bf16)
    config.profile_steps = 0  # >0: a profiler trace of that many steps into WORKDIR/profile
    config.hang_timeout_s = 1800.0  # no finished step / eval batch / phase heartbeat for this long: log stacks, exit 3
    # A CPU host (single process) as this many JAX devices, data parallel; 0: one per core (at most 8)
    # that divides the batches; 1: JAX's default. XLA_FLAGS' device count wins (cluster.split_cpu_host).
    config.cpu_devices = 0
    # k-NN accuracy of frozen cls features at eval steps ("" = off): bank split, query split.
    # Every eval encodes both, so use slices on ImageNet (e.g. "train[:2%]", "validation[:10%]").
    config.knn_split = ""
    config.knn_eval_split = ""
    # Completion PSNR of the model at eval steps on a held-out split ("" = off), its first
    # completion_images images (analysis/completion.py); mean-fill and biharmonic once per run.
    config.completion_split = ""
    config.completion_images = 64

    config.mesh = ml_collections.ConfigDict(dict(slices=1, data=-1, fsdp=1, tensor=1))
    # Mesh axes the optimizer's moments and update are split over beyond the parameters' own
    # sharding, e.g. ("data",) (weight-update sharding, sharding.update_shardings: less memory and
    # AdamW traffic per chip, one all-gather of the fp32 parameters per step); () = as the params.
    config.mesh.update_sharding = ()
    # Logical axis (models/layers.py) -> mesh axes. Parameters are split over fsdp/tensor,
    # activations over the batch axes.
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

    name = model_name(args)
    config.model = ml_collections.ConfigDict()
    config.model.name = name
    config.model.image_size = 224
    config.model.patch_size = 14 if name == "mae_vit_huge" else 16
    config.model.mask_ratio = 0.75
    config.model.norm_pix_loss = False  # the released CRATE-MAE trains without it
    paper = name.startswith("crate_mae_paper")  # the paper's options (models/presets.py, PAPER_OPTIONS)
    config.model.loss_patches = "all" if paper else "masked"  # "masked" (released, MAE) or "all" (the paper's)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.scan_layers = True
    # Large needs remat to fit 16 GiB v5e chips at batch 16/chip (aot_compile: 13.7 -> 4.4 GiB, +3% FLOPs).
    config.model.remat = "dots" if args["variant"].endswith("large") else "none"
    # auto: by platform and dtype (models/attention.py AUTO: cuDNN on GPUs in bf16, XLA's
    # autodiff form on TPUs, the symmetric form on CPUs); or symmetric | autodiff | dot_product
    # | cudnn | pallas_tpu (symmetric is CRATE-MAE's only).
    config.model.attention = "auto"
    # cuDNN pads the tokens to a multiple of this (2: the least JAX takes in training, 197 -> 198,
    # the zero row carried through the layers; 128: whole 128-token tiles, 197 -> 256, more bytes;
    # README, "cuDNN's token padding").
    config.model.cudnn_token_multiple = 2
    # How each LayerNorm's backward is written, not what it computes (models/layer_norm.py):
    # auto (saved_stats_pinned on GPUs: fewer HBM bytes there; saved_stats on CPUs and TPUs)
    # | autodiff | saved_stats | saved_stats_pinned | pallas_gpu (a Triton forward kernel, for GPUs).
    config.model.layer_norm_form = "auto"
    if name.startswith("crate_mae"):
        config.model.encoder_tokens = "all"  # "visible": the efficient variant (needs its own pretraining)
        config.model.ista_step = 0.1
        config.model.ista_lambda = 0.5
        config.model.ista_fused = True  # the release's ISTA step through an exact cheaper rewrite (models.crate)
        config.model.cls_token = not paper  # False: no cls token, features are the mean token
        config.model.mask_token_space = "pixel" if paper else "embedding"  # embedding | pixel | zeros
        config.model.position_table = "learned" if paper else "sincos"  # sincos | learned
        config.model.subtract_position_table = paper  # the paper's g^post: LN(Z) - E^pos before the output layer

    config.data = ml_collections.ConfigDict()
    config.data.name = "imagenet2012"
    config.data.backend = "grain"  # grain (TFDS array_record) | tfrecord (tf.data, reads gs://) | image_folder
    config.data.data_dir = ""  # TFDS data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets), or the image folder root
    config.data.split = "train"
    config.data.eval_split = "validation"
    config.data.transform = "mae_pretrain"  # or mae_pretrain_recolour (a few photographs: the demo); transforms.py
    config.data.eval_transform = "eval"
    config.data.shuffle = True
    config.data.worker_count = 16  # grain worker processes per host
    config.data.prefetch = 4  # batches

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.base_lr = 1.5e-4  # x batch_size / 256
    config.optim.warmup_steps = int(warmup_epochs * steps_per_epoch)
    config.optim.end_lr = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.95
    config.optim.eps = 1e-8
    config.optim.weight_decay = 0.05  # FAIR's rule: every parameter but 1-D ones and biases (tokens too)
    config.optim.no_decay = ()  # further leaf names to exempt, e.g. ("cls_token", "mask_token") as mmselfsup
    config.optim.grad_clip_norm = 0.0  # 0 = off

    if args["runlocal"]:
        config.batch_size = 16
        config.total_steps = 10
        config.log_every_steps = 5
        config.eval_every_steps = 10
        config.eval_steps = 1
        config.eval_batch_size = 16
        config.num_reconstructions = 4
        config.checkpoint_every_steps = 5
        config.optim.warmup_steps = 2
        config.model.image_size = 32
        config.model.patch_size = 4
        config.model.width = 64
        config.model.depth = 2
        config.model.num_heads = 4
        config.model.decoder_depth = 2
        config.model.decoder_num_heads = 4
        if not name.startswith("crate_mae"):
            config.model.decoder_width = 64
        config.model.dtype = "float32"
        config.model.scan_layers = False
        config.data.worker_count = 0
        config.data.prefetch = 2
    return config
