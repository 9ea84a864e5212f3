"""Linear probe on a frozen encoder, two protocols (`config.protocol`):

"fair"      FAIR MAE's `main_linprobe.py`, trained by `train.fit`: cls (or mean-pooled)
            feature -> BatchNorm without affine -> Dense; LARS (lr base_lr x batch / 256,
            momentum 0.9, no weight decay), warmup + cosine. The encoder is frozen twice over:
            its output is under stop_gradient, and the optimizer gives its parameters no update.
"logistic"  the CRATE-MAE paper's: features extracted once, full-batch multinomial logistic
            regression with the L2 strength chosen on a held-out part of the training split
            (logistic.py).

  python -m crate_jax.main --config=configs/linear_probe.py:dataset=cifar10 --config.init_from=DIR --workdir=OUT
"""

from __future__ import annotations

import jax
import optax

from crate_jax import optim, train
from crate_jax.evaluation import classify, logistic

PROTOCOLS = ("fair", "logistic")


def param_labels(params):
    """ "frozen" for the encoder's parameters, "head" for the head's."""
    return {k: jax.tree.map(lambda _, k=k: "head" if k == "head" else "frozen", v) for k, v in params.items()}


def make_optimizer(config, schedule: optax.Schedule, params) -> optax.GradientTransformation:
    """FAIR's LARS (`util/lars.py`) on the head, nothing (not even weight decay) on the encoder.

    For the head's parameters of rank > 1: add weight decay, scale by the trust ratio
    trust_coefficient x |w| / |update| (1 where either norm is 0); then momentum for all;
    then the learning rate (after the momentum, as PyTorch's SGD). The encoder's updates are
    zeros and it keeps no optimizer state (no momentum buffers the size of the encoder)."""
    oc = config.optim
    if oc.name != "lars":
        raise ValueError(f"config.optim.name={oc.name!r}: the linear probe supports 'lars'")
    labels = param_labels(params)
    head_matrices = jax.tree.map(lambda p, label: len(p.shape) > 1 and label == "head", params, labels)
    head = optax.chain(
        optax.add_decayed_weights(oc.weight_decay, mask=head_matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=oc.trust_coefficient), head_matrices),
        optax.trace(decay=oc.momentum),
        optax.scale_by_learning_rate(schedule),
    )
    return optax.multi_transform({"head": head, "frozen": optax.set_to_zero()}, labels)


def make_task(config):
    """The "fair" protocol as a `train.fit` task."""
    if config.protocol != "fair":
        raise ValueError(
            f"config.protocol={config.protocol!r}: train.fit runs the 'fair' protocol; "
            "'logistic' runs through evaluation.linear_probe.run (python -m crate_jax.main)"
        )
    schedule = optim.learning_rate(config.optim, config.batch_size, config.total_steps)
    return classify.make_task(
        config,
        head="probe",
        make_optimizer=lambda model, params: make_optimizer(config, schedule, params),
        schedule=schedule,
        augment=False,
    )


def run(config, workdir: str) -> dict[str, float]:
    """`python -m crate_jax.main` entry: either protocol."""
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"config.protocol={config.protocol!r} is not one of {PROTOCOLS}")
    if config.protocol == "logistic":
        return logistic.run(config, workdir)
    return train.train_and_evaluate(config, workdir, make_task)
