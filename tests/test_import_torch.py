"""import_torch / export_torch: layouts, errors that name keys, the round trip through files."""

import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from crate_jax import checkpoint, models  # noqa: E402
from crate_jax.tools import export_torch, import_torch  # noqa: E402
from tests import torch_reference  # noqa: E402

TINY = dict(image_size=32, patch_size=4, width=64, num_heads=4, depth=2)


@pytest.fixture(scope="module")
def state_dict():
    m = torch_reference.CrateMAE(img_size=32, patch_size=4, dim=64, depth=2, heads=4, decoder_depth=2)
    return {k: v.clone() for k, v in torch_reference.randomize_(m, seed=0).state_dict().items()}


def test_missing_unexpected_and_misshaped_keys_are_named(state_dict):
    sd = dict(state_dict)
    del sd["blocks.1.layers.0.1.fn.weight"]
    with pytest.raises(ValueError, match=r"missing 1 key\(s\), first 'blocks.1.layers.0.1.fn.weight'"):
        import_torch.convert(sd, "crate_mae_tiny", **TINY)
    sd = dict(state_dict, **{"blocks.0.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="'blocks.0.extra.weight'"):
        import_torch.convert(sd, "crate_mae_tiny", **TINY)
    sd = dict(state_dict, **{"decoder_pred.weight": torch.zeros(47, 64)})
    with pytest.raises(
        ValueError, match=r"decoder_pred.weight: checkpoint shape \(47, 64\), crate_mae_tiny expects \(48, 64\)"
    ):
        import_torch.convert(sd, "crate_mae_tiny", **TINY)
    sd = dict(state_dict)
    sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.5
    with pytest.raises(ValueError, match=r"decoder_pos_embed differs .* \(largest difference 0.5\)"):
        import_torch.convert(sd, "crate_mae_tiny", **TINY)


def test_prefix_and_wrapper_are_accepted_and_unused_keys_ignored(state_dict, caplog):
    wrapped = {"model": {f"module.{k}": v for k, v in state_dict.items()}, "args": argparse.Namespace(lr=1.0)}
    a = import_torch.convert(wrapped, "crate_mae_tiny", **TINY)
    b = import_torch.convert(state_dict, "crate_mae_tiny", **TINY)
    assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
    # pos_embed is unused by CRATE-MAE: a differing value is ignored, not an error.
    sd = dict(state_dict, pos_embed=state_dict["pos_embed"] * 0)
    import_torch.convert(sd, "crate_mae_tiny", **TINY)


def test_round_trip_through_files(state_dict, tmp_path):
    path = tmp_path / "release.pth"
    torch.save({"model": state_dict, "args": argparse.Namespace(model="mae_crate_tiny")}, path)
    loaded = import_torch.load_state_dict(str(path))  # weights_only with Namespace allowed
    params = import_torch.convert(loaded, "crate_mae_tiny", scan_layers=True, **TINY)
    out_dir = tmp_path / "imported"
    import_torch.write(params, "crate_mae_tiny", dict(TINY, scan_layers=True), str(out_dir), source=str(path))

    model, restored = checkpoint.load(str(out_dir), scan_layers=False)
    assert not model.scan_layers and "layer_1" in restored["encoder"]
    back = export_torch.export(restored, "crate_mae_tiny", **TINY)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        if key.startswith("decoder_embed"):
            continue  # unused by the model; written as the identity map
        np.testing.assert_allclose(
            back[key], value.numpy(), rtol=0, atol=1e-6 if "pos_embed" in key else 0, err_msg=key
        )

    exported = tmp_path / "exported.pth"
    export_torch.save(back, str(exported))
    ref = torch_reference.CrateMAE(img_size=32, patch_size=4, dim=64, depth=2, heads=4, decoder_depth=2)
    ref.load_state_dict(import_torch.load_state_dict(str(exported))["model"])  # strict


def test_arbitrary_pickles_are_refused(tmp_path):
    import fractions

    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "obj": fractions.Fraction(1, 3)}, path)  # any class but Namespace
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        import_torch.load_state_dict(str(path))


def test_fair_mae_round_trip():
    m = torch_reference.FairMAE(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    sd = torch_reference.randomize_(m, seed=3).state_dict()
    overrides = dict(TINY, decoder_width=32, decoder_depth=1, decoder_num_heads=4)
    params = import_torch.convert(sd, "mae_vit_base", **overrides)
    q = params["encoder"]["layer_0"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(q, sd["blocks.0.attn.qkv.weight"].numpy()[:64].T)
    back = export_torch.export(params, "mae_vit_base", **overrides)
    for key, value in sd.items():
        np.testing.assert_allclose(back[key], value.numpy(), atol=1e-6, err_msg=key)
    assert models.build("mae_vit_base", **overrides).decoder_width == 32


@pytest.mark.parametrize("arch,head,pool", [("crate", "finetune", "mean"), ("crate", "probe", "cls"),
                                            ("vit", "finetune", "cls"), ("vit", "probe", "cls")])  # fmt: skip
def test_fair_classifier_round_trip(arch, head, pool, tmp_path):
    """FAIR's models_vit layout (either backbone) -> a classifier checkpoint that `crate_jax.load`
    rebuilds with the same logits -> the same state_dict back."""
    from crate_jax import api
    from tests import torch_fair_loops

    model = torch_fair_loops.Classifier(arch=arch, img_size=32, patch_size=4, dim=64, depth=2, heads=4, num_classes=5,
                                        global_pool=pool == "mean")  # fmt: skip
    model = torch_reference.randomize_(model, seed=4)
    model.pos_embed.data.add_(0.01)  # a trained table: no longer the sin-cos one
    if head == "probe":
        model = torch_fair_loops.make_linprobe(model)
        model.head[0].running_mean.normal_(0.0, 0.1)
        model.head[0].running_var.uniform_(0.5, 1.5)
    name = "crate_mae_tiny" if arch == "crate" else "mae_vit_base"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    variables, clf = import_torch.convert_classifier(sd, name, **TINY)
    assert (clf.head, clf.pool, clf.num_classes, clf.learned_pos_embed) == (head, pool, 5, True)
    import_torch.write_classifier(variables, clf, name, dict(TINY), str(tmp_path / "clf"), source="test")
    loaded, loaded_vars = api.load(str(tmp_path / "clf"))
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(loaded.apply(loaded_vars, images)), ref, rtol=1e-4, atol=1e-5)
    back = export_torch.export_classifier(loaded_vars, loaded)
    assert set(back) == set(sd) - {"head.0.num_batches_tracked"}
    for key, value in back.items():
        np.testing.assert_allclose(value, sd[key].numpy(), atol=1e-6, err_msg=key)


def test_fair_classifier_errors_name_the_key():
    from tests import torch_fair_loops

    model = torch_fair_loops.Classifier(arch="vit", img_size=32, patch_size=4, dim=64, depth=2, heads=4, num_classes=5,
                                        global_pool=False)  # fmt: skip
    sd = dict(model.state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"misses 1 key\(s\), first 'blocks.1.mlp.fc2.bias'"):
        import_torch.convert_classifier(sd, "mae_vit_base", **TINY)
    sd = dict(model.state_dict(), **{"pos_embed": torch.zeros(1, 17, 64)})
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint shape \(1, 17, 64\), .* expects \(1, 65, 64\)"):
        import_torch.convert_classifier(sd, "mae_vit_base", **TINY)
    probe = torch_fair_loops.make_linprobe(
        torch_fair_loops.Classifier(
            arch="vit", img_size=32, patch_size=4, dim=64, depth=2, heads=4, num_classes=5, global_pool=True
        )  # fmt: skip
    )
    with pytest.raises(ValueError, match="fc_norm.weight: FAIR's global-pool linear probe"):
        import_torch.convert_classifier(probe.state_dict(), "mae_vit_base", **TINY)
