#!/usr/bin/env bash
# The GPU measurements of the accelerator-speed work in one run on one NVIDIA GPU, sized for a
# short lease (one H200, about 8 minutes; split it with STAGES over two calls if needed):
#   tests  the cuDNN attention tests on the GPU against the fp32 path (tests/test_attention.py),
#          and the LayerNorm forms against each other, the Pallas (Triton) one compiled for the
#          GPU (tests/test_layer_norm.py);
#   crate  the CRATE-MAE-B train step: attention "auto" (cuDNN in bf16, tokens padded to 198),
#          XLA's symmetric form, the visible-only encoder, LayerNorm by autodiff (ln_autodiff:
#          the step before its GPU form), cuDNN with tokens padded to 256 (attn_cudnn_128: the
#          whole-tile padding auto used before; compare its loss), the Pallas LayerNorm forward
#          (ln_pallas_gpu), beside PyTorch eager, SDPA and torch.compile;
#   vit    the ViT-MAE-B train step: "auto" (cuDNN), XLA's autodiff form, attn_cudnn_128,
#          beside PyTorch SDPA;
# A variant that fails (a kernel the GPU rejects) is a row saying so; the others still count,
# and each stage's JSON is rewritten after every row (a stage cut short keeps its rows).
# at batch 256, 224 px, bf16 compute with fp32 parameters, layers unrolled, 12 timed steps
# after 3 warm-up steps, each JAX variant traced and its top kernels printed.
#
#   bash launch/gpu_benchmark.sh OUT_DIR
#   WHEELS=.whl bash launch/gpu_benchmark.sh "$OUT"     # ml-collections from wheels (no pip index)
#   STAGES=crate BATCH=128 bash launch/gpu_benchmark.sh /tmp/gpu
#   DRY_RUN=1 bash launch/gpu_benchmark.sh /tmp/gpu      # print the commands only
#
# Needs JAX with a CUDA backend, flax, optax, orbax-checkpoint, ml-collections, absl, torch and
# pytest, nothing else of the project's dependencies: the benchmark feeds synthetic batches (no
# TensorFlow, TFDS, grain or clu). The repository is used in place (PYTHONPATH), not installed.
# Where ml_collections is missing and WHEELS names a folder of wheels, they are installed with
# --no-index into /tmp/crate_jax_site. Writes OUT_DIR/env.txt, tests.log, crate.json,
# crate.log, vit.json, vit.log. Each stage runs under `timeout` (STAGE_TIMEOUT seconds, default
# 330), so a stuck compile cannot eat the lease; the exit status is the first failing stage's.
#
# Environment: STAGES ("tests crate vit"), BATCH (256), STEPS (12), WARMUP (3), DTYPE
# (bfloat16), PYTHON (python3), CRATE_CONFIG / VIT_CONFIG (config files with arguments),
# CONFIG_FLAGS (more --config.* flags for every benchmark), CRATE_VARIANTS, CRATE_TORCH,
# VIT_VARIANTS, VIT_TORCH (comma lists; an empty torch list: no PyTorch), PROFILE_DIR
# (default /tmp/crate_jax_profile; empty: no trace), JAX_PLATFORMS (default cuda), DRY_RUN=1.
set -uo pipefail

OUT_DIR=${1:?usage: launch/gpu_benchmark.sh OUT_DIR}
STAGES=${STAGES:-tests crate vit}
BATCH=${BATCH:-256}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-3}
DTYPE=${DTYPE:-bfloat16}
PYTHON=${PYTHON:-python3}
CRATE_CONFIG=${CRATE_CONFIG:-configs/imagenet_mae.py:variant=base}
VIT_CONFIG=${VIT_CONFIG:-configs/imagenet_mae.py:model=mae_vit_base}
CONFIG_FLAGS=${CONFIG_FLAGS:-}
CRATE_VARIANTS=${CRATE_VARIANTS:-default,attn_symmetric,visible,ln_autodiff,attn_cudnn_128,ln_pallas_gpu}
CRATE_TORCH=${CRATE_TORCH-torch_eager,torch_sdpa,torch_compile}
VIT_VARIANTS=${VIT_VARIANTS:-default,attn_autodiff,attn_cudnn_128}
VIT_TORCH=${VIT_TORCH-torch_sdpa}
PROFILE_DIR=${PROFILE_DIR-/tmp/crate_jax_profile}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-330}
DRY_RUN=${DRY_RUN:-0}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

run() {  # print the command; run it unless DRY_RUN
  printf '%q ' "$@"
  echo
  [[ $DRY_RUN == 1 ]] || "$@"
}

benchmark() {  # NAME CONFIG VARIANTS TORCH_VARIANTS
  local name=$1 config=$2 variants=$3 torch_variants=$4
  local cmd=(timeout --signal=TERM --kill-after=20 "$STAGE_TIMEOUT" "$PYTHON" -m crate_jax.tools.benchmark
    --config="$config" --config.batch_size="$BATCH" --config.model.dtype="$DTYPE"
    --config.model.scan_layers=False)
  # shellcheck disable=SC2206  # CONFIG_FLAGS is a list of flags, split on spaces
  cmd+=($CONFIG_FLAGS)
  cmd+=(--variants="$variants" --steps="$STEPS" --warmup="$WARMUP" --out="$OUT_DIR/$name.json")
  [[ -n $torch_variants ]] && cmd+=(--torch --torch_variants="$torch_variants")
  [[ -n $PROFILE_DIR ]] && cmd+=(--profile="$PROFILE_DIR/$name")
  if [[ $DRY_RUN == 1 ]]; then
    run "${cmd[@]}"
  else
    run "${cmd[@]}" 2>&1 | tee "$OUT_DIR/$name.log"
  fi
}

mkdir -p "$OUT_DIR"
cd "$REPO" || exit 1
if [[ $DRY_RUN != 1 ]]; then
  if ! "$PYTHON" -c "import ml_collections" 2>/dev/null; then
    if [[ -z ${WHEELS:-} ]]; then
      echo "ml_collections is not importable: pip install ml-collections, or set WHEELS to a folder of its wheel" >&2
      exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/crate_jax_site "$WHEELS"/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/crate_jax_site"
  fi
  {
    date -u
    git -C "$REPO" log -1 --format='commit %h %s' 2>/dev/null
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PYTHON" -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1
  } > "$OUT_DIR/env.txt" 2>&1
  cat "$OUT_DIR/env.txt"
fi

status=0
for stage in $STAGES; do
  echo "== $stage"
  case $stage in
    tests)
      if [[ $DRY_RUN == 1 ]]; then
        run timeout "$STAGE_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider -n 0 tests/test_attention.py \
          tests/test_layer_norm.py -k "cudnn or gpu or layer_norm"
      else
        run timeout "$STAGE_TIMEOUT" "$PYTHON" -m pytest -q -p no:cacheprovider -n 0 tests/test_attention.py \
          tests/test_layer_norm.py -k "cudnn or gpu or layer_norm" -rs 2>&1 | tee "$OUT_DIR/tests.log"
      fi
      ;;
    crate) benchmark crate "$CRATE_CONFIG" "$CRATE_VARIANTS" "$CRATE_TORCH" ;;
    vit) benchmark vit "$VIT_CONFIG" "$VIT_VARIANTS" "$VIT_TORCH" ;;
    *)
      echo "unknown stage $stage (tests, crate, vit)" >&2
      exit 2
      ;;
  esac
  rc=$?  # pipefail: the command's status, not tee's
  echo "== $stage: exit $rc"
  ((status == 0 && rc != 0)) && status=$rc
done
exit "$status"
