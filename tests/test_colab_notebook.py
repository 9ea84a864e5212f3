"""launch/colab_tpu_demo.ipynb runs end to end on the CPU (nbclient), at a tiny setting.

Parameters reach the notebook through environment variables (its first cell reads them): no
install, 5 steps of a one-layer model, the embedded dataset built into a temporary dir.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs nbformat (pip install nbformat nbclient ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient (pip install nbformat nbclient ipykernel)")
pytest.importorskip("ipykernel", reason="needs ipykernel to run a Python kernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu_demo.ipynb"
PNG_MAGIC = b"\x89PNG"


def _outputs(nb, output_type=None):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if output_type is None or out["output_type"] == output_type:
                yield cell, out


def test_notebook_is_valid_and_has_no_stored_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("accelerator") == "TPU"
    assert not list(_outputs(nb)), "store the notebook without outputs"
    source = "\n".join(c.source for c in nb.cells)
    for needed in (
        "main.run(config, WORKDIR)",
        "import_torch.convert",
        "analyze.run(",
        'what=("completion",)',
        "jax.devices()",
    ):
        assert needed in source, needed


def test_notebook_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
    workdir = tmp_path / "demo"
    for key, value in {
        "CRATE_SKIP_INSTALL": "1",
        "CRATE_REPO_DIR": str(ROOT),
        "CRATE_DEMO_STEPS": "5",
        "CRATE_DEMO_TINY": "1",
        "CRATE_DEMO_NUM_IMAGES": "4",
        "CRATE_DEMO_WORKDIR": str(workdir),
        "CRATE_DATA_DIR": str(tmp_path / "tfds"),
        "CRATE_TORCH_CHECKPOINT": "",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    text = "".join(o.get("text", "") for _, o in _outputs(nb, "stream"))
    assert "accelerator: cpu" in text and "skipping the install" in text
    assert "CpuDevice" in text
    assert "5 steps in" in text
    assert "training from scratch" in text
    assert sorted(p.name for p in (workdir / "reconstructions").glob("*.png")) == ["step_0000005.png"]
    images = [o for _, o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert images, "no image was displayed"
    assert all(base64.b64decode(o["data"]["image/png"])[:4] == PNG_MAGIC for o in images)
    analysis = workdir / "analysis"
    if (analysis / "summary.json").exists():  # crate_jax.analyze present: attention maps and coding rate
        assert list(analysis.glob("attention*.png"))
        assert "coding_rate" in (analysis / "summary.json").read_text()
    else:
        assert "crate_jax.analyze is not available" in text
    # Masked completion: the numbers printed and the grid shown (original | masked | model | biharmonic).
    assert "completion on 4 held-out images (completion), mask ratio 0.75:" in text
    assert all(f"  {method:12s} PSNR" in text for method in ("model", "random_init", "mean_fill", "biharmonic"))
    assert (workdir / "completion" / "completion.png").exists() and (workdir / "completion" / "completion.npz").exists()


def test_import_cell_sizes_the_model_as_the_checkpoint(tmp_path, monkeypatch):
    """The optional cell that starts from PyTorch weights, run on its own: a released-layout
    .pth of a small CRATE-MAE becomes `config.init_from` with a config that builds that model."""
    pytest.importorskip("torch", reason="importing PyTorch weights needs torch")
    import jax
    import numpy as np

    from crate_jax import checkpoint, models
    from crate_jax.tools import export_torch

    overrides = {"image_size": 32, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 2}
    model = models.build("crate_mae_tiny", **overrides)
    params = models.abstract_params(model)
    params = jax.tree.map(lambda a: np.random.default_rng(0).normal(size=a.shape).astype(a.dtype), params)
    pth = tmp_path / "crate_mae_tiny.pth"
    export_torch.save(export_torch.export(params, "crate_mae_tiny", **overrides), str(pth))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    (params_cell,) = [s for s in sources if "TORCH_CHECKPOINT = os.environ" in s]
    (config_cell,) = [s for s in sources if "load_config(os.path.join(REPO_DIR" in s]
    (import_cell,) = [s for s in sources if "import_torch.convert" in s]
    env = {
        "CRATE_REPO_DIR": str(ROOT),
        "CRATE_DEMO_WORKDIR": str(tmp_path / "demo"),
        "CRATE_TORCH_CHECKPOINT": str(pth),
        "CRATE_TORCH_MODEL": "crate_mae_tiny",
        "CRATE_TORCH_OVERRIDES": json.dumps(overrides),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    namespace: dict = {"jax": jax}
    for source in (params_cell, config_cell, import_cell):
        exec(compile(source, "colab_tpu_demo.ipynb", "exec"), namespace)  # noqa: S102 - our own notebook

    config = namespace["config"]
    assert config.init_from == str(tmp_path / "demo_imported")
    built = models.build(config.model.name, **{k: v for k, v in config.model.items() if k != "name"})
    _, loaded = checkpoint.load(config.init_from, scan_layers=built.scan_layers)
    assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, models.abstract_params(built))
