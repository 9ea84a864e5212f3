"""What the linear probe and fine-tuning share as `train.fit` tasks.

The classifier from the config (classifier.py on the encoder of `config.init_from`), its
initial parameters (the pretrained encoder and a fresh head; from a classifier checkpoint,
e.g. FAIR's imported by `import_torch`, its encoder and position table, and its head and
BatchNorm statistics when head, pool and class count match the config), the train step (soft-target
cross-entropy, mixup / cutmix / label smoothing when the task asks, gradient accumulation,
BatchNorm statistics carried in `TrainState.model_state`) and the evaluation (top-1 and top-5
accuracy on the eval split, logged as `eval_accuracy` / `eval_top5_accuracy`, and written to
WORKDIR/{task}.json).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from etils import epath

from crate_jax import checkpoint, step
from crate_jax.evaluation import backbone, classifier, mixup
from crate_jax.models.layers import sincos_table_2d
from crate_jax.train import Task, eval_batches

# RNG streams after those of crate_jax/step.py (params 0, mask 1, eval mask 2).
DROPOUT_STREAM, MIX_STREAM, HEAD_STREAM = 3, 4, 5


def make_classifier(config, head: str, drop_path_rate: float = 0.0) -> tuple[classifier.Classifier, dict[str, Any]]:
    """(classifier, meta["model"] for its checkpoints), with one-line config errors."""
    if config.num_classes < 1:
        raise ValueError(f"config.num_classes={config.num_classes} must be >= 1")
    if config.head.pool not in classifier.POOLS:
        raise ValueError(f"config.head.pool={config.head.pool!r} is not one of {classifier.POOLS}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"config.drop_path_rate={drop_path_rate} must be in [0, 1)")
    backbone_spec = backbone.spec(config, allow_classifier=True)
    model = classifier.from_autoencoder(
        backbone.build(backbone_spec),
        num_classes=config.num_classes,
        head=head,
        pool=config.head.pool,
        head_init_std=config.head.init_std,
        drop_path_rate=drop_path_rate,
        learned_pos_embed=True,
    )
    return model, classifier.classifier_spec(backbone_spec, model)


def stored_classifier(config) -> dict[str, Any] | None:
    """The classifier fields of `config.init_from` when it holds a classifier, else None."""
    if not backbone.pretrained(config):
        return None
    return checkpoint.read_meta(config.init_from)["model"].get("classifier")


def head_fits(stored: dict[str, Any] | None, model: classifier.Classifier) -> bool:
    """Whether a stored classifier's head can start this run's (same kind, pool and classes)."""
    return stored is not None and (stored["head"], stored["pool"], stored["num_classes"]) == (
        model.head, model.pool, model.num_classes,
    )  # fmt: skip


def _loader(config, model: classifier.Classifier) -> Callable[[], dict[str, Any]]:
    """The variables of the classifier checkpoint in init_from, read once."""
    return functools.cache(lambda: classifier.load_classifier(config.init_from, scan_layers=model.scan_layers)[1])


def initial_params_fn(config, model: classifier.Classifier, load_stored=None) -> Callable[[Any], Any]:
    """abstract params -> the pretrained encoder plus a fresh head (None: all fresh); from a
    classifier checkpoint also its head when `head_fits`."""

    def initial_params(abstract_params):
        if not backbone.pretrained(config):
            return None
        stored = stored_classifier(config)
        if stored is None:
            _, source = checkpoint.load(config.init_from, scan_layers=model.scan_layers)
        else:
            source = (load_stored or _loader(config, model))()["params"]
        params = classifier.encoder_params(source, abstract_params)
        if head_fits(stored, model):
            params["head"] = source["head"]
        elif stored is not None:
            logging.info("config.init_from holds a %s head (%s pool, %d classes): this run starts a fresh %s head",
                         stored["head"], stored["pool"], stored["num_classes"], model.head)  # fmt: skip
        if "pos_embed" in abstract_params and "pos_embed" not in params:  # a fixed table before: its values
            grid = model.image_size // model.patch_size
            params["pos_embed"] = jnp.asarray(sincos_table_2d(model.width, grid, grid)[None], jnp.float32)
        if "head" not in params:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), step.PARAMS_STREAM), HEAD_STREAM)
            features = jnp.zeros((1, model.width), jnp.float32)
            params["head"] = jax.jit(lambda k: nn.unbox(model.make_head().init(k, features))["params"])(key)
        return params

    return initial_params


def init_variables_fn(config, model: classifier.Classifier, load_stored) -> Callable[[Any], Any]:
    """`classifier.init_variables`, with the BatchNorm statistics of init_from's head when it
    starts this run's head (FAIR's probe checkpoints carry them)."""
    init = classifier.init_variables(model)
    if not head_fits(stored_classifier(config), model):
        return init
    stats = {k: v for k, v in load_stored().items() if k != "params"}
    if not stats:
        return init

    def init_with_stats(key):
        return dict(init(key), **stats)

    return init_with_stats


def _split(x: jax.Array, batch_size: int, grad_accum_steps: int) -> jax.Array:
    """Strided micro-batches (each device keeps its share of every one), as crate_jax/step.py."""
    return x.reshape(batch_size // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(model, tx, schedule, config, *, augment: bool):
    """step(state, batch) -> (state, metrics): one update on the weighted mean of the
    soft-target cross-entropy over the global batch."""
    batch_size, accum, num_classes = config.batch_size, config.grad_accum_steps, config.num_classes

    def loss_sum(params, model_state, images, targets, labels, weight, key):
        variables = {"params": params, **model_state}
        kwargs = dict(train=True, mask=weight > 0, rngs={"dropout": key})
        if model_state:
            logits, model_state = model.apply(variables, images, mutable=list(model_state), **kwargs)
        else:
            logits = model.apply(variables, images, **kwargs)
        logits = logits.astype(jnp.float32)
        loss = jnp.sum(optax.softmax_cross_entropy(logits, targets) * weight)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * weight)
        return loss, (jnp.sum(weight), model_state, correct)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(state: step.TrainState, batch: dict[str, jax.Array]):
        images, labels, weight = batch["image"], batch["label"], batch["weight"]
        seed_key = jax.random.key(config.seed)
        if augment:
            aug = config.augment
            images, targets, _ = mixup.mix(
                jax.random.fold_in(jax.random.fold_in(seed_key, MIX_STREAM), state.step),
                images,
                labels,
                num_classes=num_classes,
                mixup_alpha=aug.mixup,
                cutmix_alpha=aug.cutmix,
                mix_prob=aug.mix_prob,
                switch_prob=aug.switch_prob,
                label_smoothing=aug.label_smoothing,
            )
        else:
            targets = mixup.smooth_one_hot(labels, num_classes, 0.0)
        dropout_key = jax.random.fold_in(jax.random.fold_in(seed_key, DROPOUT_STREAM), state.step)
        if accum == 1:
            (loss, (denom, model_state, correct)), grads = grad_fn(
                state.params, state.model_state, images, targets, labels, weight, dropout_key
            )
        else:

            def micro(carry, xs):
                grads_acc, loss_acc, denom_acc, correct_acc, model_state = carry
                i, *batch_xs = xs
                key = jax.random.fold_in(dropout_key, i)
                (loss, (denom, model_state, correct)), grads = grad_fn(state.params, model_state, *batch_xs, key)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (grads_acc, loss_acc + loss, denom_acc + denom, correct_acc + correct, model_state), None

            zero = jnp.zeros((), jnp.float32)
            init = (jax.tree.map(jnp.zeros_like, state.params), zero, zero, zero, state.model_state)
            xs = [jnp.arange(accum)] + [_split(x, batch_size, accum) for x in (images, targets, labels, weight)]
            (grads, loss, denom, correct, model_state), _ = jax.lax.scan(micro, init, xs)
        denom = jnp.maximum(denom, 1e-12)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss / denom,
            "accuracy": correct / denom,  # against the unmixed labels
            "lr": schedule(state.step),
            "grad_norm": optax.global_norm(grads),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        return new_state, metrics

    return train_step


def make_eval_step(model, num_classes: int):
    """(params, model_state, batch) -> weighted sums: correct, correct in the top 5, loss, weight."""
    top = min(5, num_classes)

    def eval_step(params, model_state, batch):
        logits = model.apply({"params": params, **model_state}, batch["image"], train=False).astype(jnp.float32)
        labels, weight = batch["label"], batch["weight"]
        top_k = jax.lax.top_k(logits, top)[1]
        return {
            "correct": jnp.sum((top_k[:, 0] == labels) * weight),
            "correct_top5": jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * weight),
            "loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weight),
            "weight": jnp.sum(weight),
        }

    return eval_step


class Evaluator:
    """Top-1 / top-5 accuracy and loss over `config.eval_steps` batches of the eval split."""

    def __init__(self, config, model):
        self.config = config
        self.eval_step = jax.jit(make_eval_step(model, config.num_classes))

    def __call__(self, state, step_num: int, mesh, log, workdir) -> None:
        sums: dict[str, float] = {}
        for batch in eval_batches(self.config, mesh):
            out = jax.device_get(self.eval_step(state.params, state.model_state, batch))
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in out.items()}
        weight = max(sums["weight"], 1e-12)
        metrics = {
            "eval_accuracy": sums["correct"] / weight,
            "eval_top5_accuracy": sums["correct_top5"] / weight,
            "eval_loss": sums["loss"] / weight,
            "eval_examples": sums["weight"],
        }
        log.scalars(step_num, metrics)
        if jax.process_index() == 0:
            record = {"step": step_num, "split": self.config.data.eval_split, **metrics}
            (epath.Path(workdir) / f"{self.config.task}.json").write_text(json.dumps(record, indent=2))


def make_task(config, *, head: str, make_optimizer, schedule, augment: bool, drop_path_rate: float = 0.0) -> Task:
    """A `train.fit` task training `head` on the encoder of `config.init_from`.

    `make_optimizer(classifier, abstract params) -> optax transformation`."""
    model, model_spec = make_classifier(config, head, drop_path_rate)
    load_stored = _loader(config, model)
    return Task(
        model_spec=model_spec,
        init_variables=init_variables_fn(config, model, load_stored),
        make_optimizer=lambda params: make_optimizer(model, params),
        make_step=lambda tx: make_train_step(model, tx, schedule, config, augment=augment),
        evaluate=Evaluator(config, model),
        initial_params=initial_params_fn(config, model, load_stored),
        train_transform=config.data.transform,
    )
