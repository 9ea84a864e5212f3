r"""Where a compiled step's HBM bytes go: the optimised HLO's top-level instructions, grouped by
the source they were traced from.

    python -m crate_jax.tools.aot_compile ... --dump_hlo=/tmp/step.hlo
    python -m crate_jax.tools.hlo_bytes /tmp/step.hlo [--top=25]

Each instruction of the entry computation (a fusion, a dot, a collective) reads its operands
and writes its result: its bytes are the sizes of those arrays that live in HBM, as XLA's cost
analysis counts a fusion's "bytes accessed" to first order (an operand a fusion only slices is
counted whole). Arrays the TPU compiler placed in on-chip memory (layout `S(1)`) are left out;
an asynchronous move into or out of it (`copy-start`, `slice-start`) counts its bytes once. The instruction's
`op_name` metadata says which part of the program it came from (a copy or move without one
takes the source of the array it carries: a step argument, or the instruction that made it):

  "jit(step)/jvp(ViTMAE)/encoder/layer_3/attn/query/dot_general"  -> encoder/attn/query, forward
  "jit(step)/transpose(jvp(ViTMAE))/decoder/layer_0/norm1/..."     -> decoder/norm1, backward

Layer indices are dropped, so a group sums over the layers. Instructions outside the model
(`jit(step)/add`, ...) are the optimizer's side: AdamW, the global norms, `apply_updates`;
moves of the step's arguments (`state.params[...]`, `state.opt_state[...]`, the batch) into and
out of on-chip memory are counted as such.
An unrolled step (`scan_layers=False`) keeps every layer at the top level; a scanned one hides
its layers inside a while loop, which this counts once, as XLA's cost analysis does.
"""

from __future__ import annotations

import collections
import math
import re
import sys

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# An array type with its layout: f32[16,197,768]{2,1,0:T(8,128)S(1)}; S(n) with n > 0 is an
# on-chip memory space (VMEM on TPUs), not HBM.
_ARRAY_RE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_OPERAND_RE = re.compile(r"%([\w.\-]+)")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
# No HBM traffic of their own: aliases, tuples, constants, the second halves of async pairs
# (the start is counted) and TPU's ConcatBitcast (a view of its operands).
_FREE_OPS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
    "after-all", "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done", "slice-done",
    "async-done", "opt-barrier",
}  # fmt: skip
# Asynchronous moves between memory spaces: the result, (operand(s), destination, context),
# moves its destination's bytes once.
_MOVE_OPS = {"copy-start", "slice-start"}
ARGUMENTS = "step arguments: parameters, moments, batch"
UNATTRIBUTED = "(no source)"
_MODEL_RE = re.compile(r"^(?P<dir>transpose\()?jvp\((?P<model>[\w]+)\)\)?/(?P<path>.*)$")


def array_bytes(type_text: str, hbm_only: bool = False) -> int:
    """Bytes of every array in an HLO type (an array or a tuple of arrays); `hbm_only`: leave
    out arrays laid out in an on-chip memory space (`S(1)`)."""
    return sum(
        _bytes(dtype, dims)
        for dtype, dims, layout in _ARRAY_RE.findall(type_text)
        if not (hbm_only and re.search(r"S\([1-9]\d*\)", layout or ""))
    )


def _bytes(dtype: str, dims: str) -> int:
    return math.prod(int(d) for d in filter(None, dims.split(","))) * _DTYPE_BYTES[dtype]


def _moved_bytes(out_type: str) -> int:
    """The destination of an async move's result type ((operands), destination, context)."""
    arrays = _ARRAY_RE.findall(out_type)
    if len(arrays) < 2:
        return array_bytes(out_type)
    dtype, dims, _ = arrays[-2]  # the last array is the context scalar
    return _bytes(dtype, dims)


def entry_lines(hlo_text: str) -> list[str]:
    lines = hlo_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ENTRY "):
            body = []
            for rest in lines[i + 1 :]:
                if rest.startswith("}"):
                    break
                body.append(rest)
            return [line, *body]
    raise ValueError("no ENTRY computation in the HLO text")


def instruction_result(line: str) -> str | None:
    """The result type of an HLO instruction line (`%x = bf16[8,197,197]{...} fusion(...)`)."""
    m = _INSTR_RE.match(line)
    return m.group(2) if m else None


def _parameters(signature: str, hbm_only: bool) -> dict[str, int]:
    """name -> bytes of the entry computation's parameters, from its signature line."""
    head = signature[signature.index("(") + 1 : signature.index(") ->")]
    out = {}
    for m in re.finditer(r"([\w.\-]+):\s*((?:\([^)]*\))|[^,]+)", head):
        out[m.group(1)] = array_bytes(m.group(2), hbm_only)
    return out


def source(op_name: str) -> tuple[str, str]:
    """(group, direction) of an instruction from its op_name: the model path without layer
    indices and the primitive ("encoder/attn/query", "forward"), or the optimizer's side."""
    if not op_name:
        return UNATTRIBUTED, "step"
    if op_name.startswith(("state.", "batch")):
        return ARGUMENTS, "step"
    name = op_name.split("/", 1)[1] if op_name.startswith("jit(") else op_name
    m = _MODEL_RE.match(name)
    if m is None:
        if "masking_noise" in name:
            return "masking noise", "step"
        return "optimizer: update, norms", "step"
    parts = [p for p in m.group("path").split("/") if not re.fullmatch(r"layer_\d+", p)]
    # Drop the primitive (dot_general, reduce_sum, ...) and einsum specs: keep module names.
    parts = [p for p in parts[:-1] if "," not in p and "->" not in p] or ["(top level)"]
    return "/".join(parts[:3]), "backward" if m.group("dir") else "forward"


def bytes_by_source(hlo_text: str, hbm_only: bool = True) -> dict[str, dict[str, float]]:
    """{group: {"forward": bytes, "backward": bytes, "step": bytes}} for the entry computation.
    `hbm_only=False` counts on-chip arrays too, as XLA's cost analysis does."""
    lines = entry_lines(hlo_text)
    sizes = _parameters(lines[0], hbm_only)
    groups: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    origin = {name: (ARGUMENTS, "step") for name in sizes}
    for line in lines[1:]:
        m = _INSTR_RE.match(line)
        if not m:
            continue
        name, out_type, op, rest = m.groups()
        sizes[name] = array_bytes(out_type, hbm_only)
        args = rest.split("),", 1)[0] if ")," in rest else rest
        operands = _OPERAND_RE.findall(args)
        op_name = _OP_NAME_RE.search(line)
        if op == "parameter":
            origin[name] = (ARGUMENTS, "step")
        elif op_name:
            origin[name] = source(op_name.group(1))
        else:  # a copy, move or view: the source of what it carries
            origin[name] = next((origin[o] for o in operands if o in origin), (UNATTRIBUTED, "step"))
        if op in _FREE_OPS or (op == "custom-call" and 'custom_call_target="ConcatBitcast"' in rest):
            continue
        if op in _MOVE_OPS:
            total = _moved_bytes(out_type)
        else:
            total = sizes[name] + sum(sizes.get(o, 0) for o in operands)
        group, direction = origin[name]
        groups[group][direction] += total
    return {g: dict(d) for g, d in groups.items()}


def totals(groups: dict[str, dict[str, float]]) -> dict[str, float]:
    """{group: bytes over all directions}, largest first."""
    return dict(sorted(((g, sum(d.values())) for g, d in groups.items()), key=lambda kv: -kv[1]))


def format_table(groups: dict[str, dict[str, float]], top: int = 25) -> str:
    sums = totals(groups)
    total = sum(sums.values())
    rows = [(g, groups[g]) for g in sums]
    out = [f"{'source':<48} {'forward GB':>10} {'backward GB':>11} {'step GB':>8} {'share':>6}"]
    for group, d in rows[:top]:
        out.append(
            f"{group:<48} {d.get('forward', 0) / 1e9:>10.3f} {d.get('backward', 0) / 1e9:>11.3f} "
            f"{d.get('step', 0) / 1e9:>8.3f} {sums[group] / max(total, 1):>6.1%}"
        )
    if len(rows) > top:
        rest = sum(sums[g] for g, _ in rows[top:])
        more = f"({len(rows) - top} more)"
        out.append(f"{more:<48} {'':>10} {'':>11} {rest / 1e9:>8.3f} {rest / max(total, 1):>6.1%}")
    out.append(f"{'total':<48} {'':>10} {'':>11} {total / 1e9:>8.3f}")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    top, hbm_only, paths = 25, True, []
    for arg in argv[1:]:
        if arg.startswith("--top="):
            top = int(arg.split("=", 1)[1])
        elif arg == "--all_memory":
            hbm_only = False
        else:
            paths.append(arg)
    if len(paths) != 1:
        raise SystemExit("usage: python -m crate_jax.tools.hlo_bytes STEP.hlo [--top=N] [--all_memory]")
    with open(paths[0]) as f:
        print(format_table(bytes_by_source(f.read(), hbm_only), top))


if __name__ == "__main__":
    main(sys.argv)
