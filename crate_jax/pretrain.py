"""The masked-autoencoder pretraining task: what `train.fit` needs to pretrain CRATE-MAE
or ViT-MAE (the step, the evaluation, the initial parameters)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from crate_jax import checkpoint, models, optim, step, visualize
from crate_jax.analysis import coding_rate, completion
from crate_jax.evaluation import features, knn
from crate_jax.models.mae import CrateMAE
from crate_jax.tools import flops
from crate_jax.train import Task, eval_batches

# The PNG grid is enlarged to at least this many pixels per image, so 32 px demos are legible.
MIN_DISPLAY_PIXELS = 128


def model_overrides(model_config) -> dict[str, Any]:
    return {k: v for k, v in model_config.items() if k != "name"}


def make_task(config) -> Task:
    model = models.build(config.model.name, **model_overrides(config.model))
    schedule = optim.learning_rate(config.optim, config.batch_size, config.total_steps)

    def make_step(tx):
        return step.make_train_step(
            model,
            tx,
            schedule,
            seed=config.seed,
            batch_size=config.batch_size,
            grad_accum_steps=config.grad_accum_steps,
        )

    def initial_params(abstract_params):
        if not config.init_from:
            return None
        _, loaded = checkpoint.load(config.init_from, scan_layers=model.scan_layers)
        if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, abstract_params):
            raise ValueError(f"config.init_from={config.init_from}: its parameters do not match config.model")
        return loaded

    return Task(
        model_spec=checkpoint.model_spec(config.model.name, model_overrides(config.model)),
        init_variables=step.image_init(model),
        make_optimizer=lambda params: optim.make_optimizer(config.optim, schedule, params),
        make_step=make_step,
        evaluate=Evaluator(config, model),
        initial_params=initial_params,
        train_transform=config.data.transform,
        flops_per_step=flops.for_model(model).train_step(config.batch_size),
    )


class Evaluator:
    """Held-out reconstruction loss, a PNG grid of reconstructions and, for CRATE-MAE, the
    per-layer coding rate and ISTA sparsity on un-masked images (the white-box view)."""

    def __init__(self, config, model):
        self.config = config
        self.model = model
        self.eval_step = jax.jit(step.make_eval_step(model, seed=config.seed, batch_size=config.eval_batch_size))
        self.reconstruct = jax.jit(
            step.make_reconstruct(model, seed=config.seed, num_images=config.num_reconstructions)
        )
        self.diagnose = jax.jit(self._diagnostics) if isinstance(model, CrateMAE) else None
        self.completion = completion.TrainingMetric(config, model) if config.completion_split else None

    def _diagnostics(self, params, images):
        unmasked = self.model.clone(mask_ratio=0.0)
        noise = jax.numpy.zeros((images.shape[0], unmasked.num_patches))
        inter = unmasked.apply({"params": params}, images, noise=noise, capture=True).intermediates
        enc = coding_rate.layer_coding_rates(inter["encoder"]["qkv"], unmasked.num_heads)
        dec = coding_rate.layer_coding_rates(inter["decoder"]["qkv"], unmasked.decoder_num_heads)
        sparse = jax.vmap(jax.vmap(coding_rate.sparsity))(inter["encoder"]["ista"])
        return enc.mean(axis=-1), dec.mean(axis=-1), sparse.mean(axis=-1)

    def __call__(self, state, step_num: int, mesh, log, workdir) -> None:
        config, model = self.config, self.model
        total, weight, first = 0.0, 0.0, None
        for batch in eval_batches(config, mesh):
            first = batch if first is None else first
            loss_sum, denom = jax.device_get(self.eval_step(state.params, batch))
            total, weight = total + float(loss_sum), weight + float(denom)
        metrics = {"eval_loss": total / max(weight, 1e-12)}
        if self.diagnose is not None:
            enc, dec, sparse = jax.device_get(self.diagnose(state.params, first["image"]))
            metrics |= {f"coding_rate/encoder_{i}": float(v) for i, v in enumerate(enc)}
            metrics |= {f"coding_rate/decoder_{i}": float(v) for i, v in enumerate(dec)}
            metrics |= {f"sparsity/encoder_{i}": float(v) for i, v in enumerate(sparse)}
        if self.completion is not None:  # completion PSNR on held-out photographs, and its baselines
            metrics |= self.completion(state.params)
        if config.knn_split:  # frozen-feature k-NN accuracy on a labelled split, as DINO

            def batches(split):
                return features.split_batches(config, mesh, split, config.data.eval_transform, config.eval_batch_size)

            metrics["knn_accuracy"] = knn.knn_accuracy(
                model, state.params, batches(config.knn_split), batches(config.knn_eval_split)
            )
        log.scalars(step_num, metrics)

        pred, mask = self.reconstruct(state.params, first["image"])
        images = multihost_utils.process_allgather(first["image"][: config.num_reconstructions], tiled=True)
        pred, mask = multihost_utils.process_allgather((pred, mask), tiled=True)
        grid = visualize.reconstruction_grid(images, pred, mask, model.patch_size, model.norm_pix_loss)
        factor = max(1, MIN_DISPLAY_PIXELS // model.image_size)
        grid = np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)
        if jax.process_index() == 0:
            visualize.save_png(grid, epath.Path(workdir) / "reconstructions" / f"step_{step_num:07d}.png")
        log.images(step_num, {"reconstructions": grid[None]})
