"""tools/hlo_bytes: HBM bytes of a compiled step's instructions, grouped by source.

A hand-written entry computation in the optimised-HLO syntax of a TPU compile (layouts with
tiles and memory spaces), so every count below is worked out by hand; the report on a real
compiled step is checked in test_aot_compile.py."""

from __future__ import annotations

import pytest

from crate_jax.tools import hlo_bytes

HLO = """\
HloModule jit_step

%fused_computation (p0: f32[64,128]) -> f32[64,128] {
  %p0 = f32[64,128]{1,0} parameter(0)
  ROOT %neg = f32[64,128]{1,0} negate(%p0)
}

ENTRY %main.1_spmd (param.1: f32[64,128], param.2: bf16[8,64]) -> (f32[64,128], bf16[8,128]) {
  %param.1 = f32[64,128]{1,0:T(8,128)} parameter(0)
  %param.2 = bf16[8,64]{1,0:T(8,128)(2,1)} parameter(1)
  %copy-start.1 = (f32[64,128]{1,0:T(8,128)}, f32[64,128]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%param.1)
  %copy-done.1 = f32[64,128]{1,0:T(8,128)S(1)} copy-done(%copy-start.1)
  %convert.1 = bf16[64,128]{1,0:T(8,128)(2,1)S(1)} convert(%copy-done.1), metadata={op_name="jit(step)/jvp(ViTMAE)/encoder/layer_0/fc1/convert_element_type"}
  %dot.1 = bf16[8,128]{1,0:T(8,128)(2,1)} dot(%param.2, %convert.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(ViTMAE)/encoder/layer_1/fc1/dot_general"}
  %dot.2 = bf16[64,128]{1,0:T(8,128)(2,1)} dot(%param.2, %dot.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp(ViTMAE))/encoder/layer_0/fc1/dot_general"}
  %fusion.1 = f32[64,128]{1,0:T(8,128)} fusion(%param.1, %dot.2), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/add"}
  %bitcast.1 = f32[8192]{0} bitcast(%fusion.1)
  ROOT %tuple.1 = (f32[64,128]{1,0:T(8,128)}, bf16[8,128]{1,0:T(8,128)(2,1)}) tuple(%fusion.1, %dot.1)
}
"""

F32, BF16 = 64 * 128 * 4, 64 * 128 * 2  # the (64, 128) arrays
X, Y = 8 * 64 * 2, 8 * 128 * 2  # param.2 and dot.1


def test_array_bytes_and_memory_spaces():
    assert hlo_bytes.array_bytes("f32[64,128]{1,0:T(8,128)}") == F32
    assert hlo_bytes.array_bytes("(f32[2,3], bf16[4], s32[])") == 24 + 8 + 4
    assert hlo_bytes.array_bytes("bf16[64,128]{1,0:T(8,128)(2,1)S(1)}") == BF16
    assert hlo_bytes.array_bytes("bf16[64,128]{1,0:T(8,128)(2,1)S(1)}", hbm_only=True) == 0


def test_bytes_by_source_counts_hbm_operands_and_results():
    groups = hlo_bytes.bytes_by_source(HLO)
    # The copy into on-chip memory moves the parameter once; the convert works on chip only.
    assert groups[hlo_bytes.ARGUMENTS] == {"step": F32}
    assert groups["encoder/fc1"]["forward"] == pytest.approx(0 + (X + Y))  # dot.1: param.2 in, dot.1 out
    assert groups["encoder/fc1"]["backward"] == pytest.approx(X + Y + BF16)  # dot.2
    assert groups["optimizer: update, norms"] == {"step": F32 + BF16 + F32}  # fusion.1 reads two, writes one
    assert set(groups) == {hlo_bytes.ARGUMENTS, "encoder/fc1", "optimizer: update, norms"}


def test_all_memory_counts_on_chip_arrays_too():
    groups = hlo_bytes.bytes_by_source(HLO, hbm_only=False)
    assert groups["encoder/fc1"]["forward"] == pytest.approx(F32 + BF16 + X + BF16 + Y)  # convert.1, dot.1


def test_sources():
    assert hlo_bytes.source("jit(step)/transpose(jvp(CrateMAE))/decoder/layer_7/mssa/qkv/dot_general") == (
        "decoder/mssa/qkv",
        "backward",
    )
    assert hlo_bytes.source("jit(step)/jvp(ViTMAE)/encoder/layer_0/attn/bqkp,bskp->bkqs/dot_general") == (
        "encoder/attn",
        "forward",
    )
    assert hlo_bytes.source("state.opt_state[0].nu['encoder']")[0] == hlo_bytes.ARGUMENTS
    assert hlo_bytes.source("jit(step)/jit(_threefry_fold_in)/masking_noise/xor")[0] == "masking noise"


def test_table_and_errors(tmp_path, capsys):
    path = tmp_path / "step.hlo"
    path.write_text(HLO)
    hlo_bytes.main(["hlo_bytes", str(path), "--top=1"])
    out = capsys.readouterr().out
    assert "optimizer: update, norms" in out and "(2 more)" in out and "total" in out
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_bytes.bytes_by_source("HloModule m\n")
