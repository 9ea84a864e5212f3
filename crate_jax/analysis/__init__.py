"""White-box diagnostics of CRATE-MAE (shared/docs/crate-mae-spec.md, "White-box diagnostics").

  coding_rate  R^c of the MSSA input features and sparsity of the ISTA outputs (pure jnp)
  attention    cls-query attention maps per head, DINO style (without a cls token: the mean over queries)
  pca          PCA of patch features shown as RGB
  plots        matplotlib figures: R^c / sparsity against depth, attention over layers

The numbers are pure functions of the intermediates the model captures (`capture=True`);
`crate_jax.analyze` runs them on a checkpoint and writes PNGs and `summary.json`.
"""

from crate_jax.analysis import attention, coding_rate, pca, plots

__all__ = ["attention", "coding_rate", "pca", "plots"]
