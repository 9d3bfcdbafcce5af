#!/usr/bin/env bash
# Everything the GPU machine has to check and time (the device lease is short).
#   bash benchmarks/gpu_suite.sh [stage ...]     stages: setup tests kernels itersplit schedule ab models modelprofile
#                                               compiled fusedglue statecap v26 v27 regs profile2048 lm
#                                               demo
#                                               (default: setup tests kernels models lm)
# One device call may run 10 minutes, so run the stages in a few calls, each starting with setup. Measured stage
# times on the H200 (2026-11-29): setup 20 s, schedule ~1.5 min, kernels 45 s, models ~6 min for all 12 models
# (MODELS_BUDGET=470), modelprofile 30 s, compiled ~9 min (gka_small's 3 specs, train 224 + 1024 px: 150 s),
# fusedglue 70 s, demo 35 s, lm ~8 min. tests: all 55 GPU cases no longer fit one call; on a cold H100 (session 13)
# the first 50 took ~330 s, so run `TESTS_K="not model_compiles"` and `TESTS_K=model_compiles` in separate calls.
# regs (the register report) ~40 s. A call's own files come back only if the command gets to copy them: end each
# stage group with the copy, inside the 600 s. E.g.
#   setup tests schedule kernels      setup models      setup modelprofile demo fusedglue
# Writes logs, JSON, markdown and PNGs under $OUT (default benchmarks/results). Each stage has its own time limit
# and a failing stage does not stop the others; the exit code is the number of failed stages.
# fla (the kernels table's chunk_simple_gla columns) is not in the GPU image and the machine has no internet: download
# its wheel here once (`python3 -m pip download --no-deps -d .whl fla-core==0.4.1`; .whl/ is git-ignored locally)
# and carry .whl; setup installs it into /tmp/fla_site, which is on PYTHONPATH for every stage (Python skips the
# entry while the folder does not exist).
set -uo pipefail
cd "$(dirname "$0")/.."
FLA_SITE=/tmp/fla_site
export PYTHONPATH="$FLA_SITE${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(setup tests kernels models lm)
failed=0

run_stage() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || failed=$((failed + 1))
}

for s in "${stages[@]}"; do
  case $s in
    setup)
      # The GPU image has torch/triton/timm; install only our package, offline, without touching them.
      run_stage setup 120 bash -c 'python3 -m pip install -q --no-deps --no-build-isolation -e . && \
        python3 -c "import torch, triton, timm, gka_kernels, gka_vision; print(torch.__version__, triton.__version__, \
        timm.__version__, torch.cuda.get_device_name(), gka_kernels.resolve_backend(None, torch.device(\"cuda\")))"'
      if ls .whl/fla_core-*.whl > /dev/null 2>&1 && [ ! -d "$FLA_SITE" ]; then
        run_stage setup_fla 60 python3 -m pip install -q --no-index --no-deps --no-compile --target "$FLA_SITE" \
          .whl/fla_core-*.whl
      fi ;;
    tests)   # TESTS_ARGS: more pytest arguments, split on spaces; TESTS_K: a -k expression (it may hold spaces)
             run_stage tests ${TESTS_LIMIT:-420} python3 -m pytest -q -rf -m gpu ${TESTS_ARGS:-} \
               ${TESTS_K:+-k "$TESTS_K"} tests ;;
    kernels) # ~70 s warm; fla autotunes each shape on its first call, so a cold machine with fla takes ~5 min
             run_stage kernels ${KERNELS_LIMIT:-420} python3 benchmarks/kernels.py --out "$OUT" ;;
    itersplit)  # what one solve step costs in the forward and in the backward (KERNEL_NOTES "What the targets need")
             run_stage itersplit 300 python3 benchmarks/kernels.py --iter-split --out "$OUT" ;;
    models)  # MODELS_BUDGET seconds (default 270) before the sweep stops starting new measurements; MODELS_ARGS: more flags
             run_stage models $((${MODELS_BUDGET:-270} + 60)) python3 benchmarks/models.py --out "$OUT" \
               --budget-s "${MODELS_BUDGET:-270}" ${MODELS_ARGS:-} ;;
    modelprofile)  # where gka_small's time goes at 1024 px (kernel vs projections vs glue), and DeiT-S's
             run_stage modelprofile 120 bash -c "python3 benchmarks/models.py --out '$OUT' --profile gka_small && \
               python3 benchmarks/models.py --out '$OUT' --profile deit_small_patch16_224" ;;
    compiled)  # torch.compile (default mode, and CUDA graphs) against eager, interleaved per model (ab.py --specs);
               # for gka_small also the glue kernels as graph breaks instead of the one-op mixer core
               # (GKA_COMPILE_CORE=0, read when the model is built; models/core_op.py)
             run_stage compiled_gka 420 python3 benchmarks/ab.py --out "$OUT/compiled_gka" --rounds 3 \
               --sizes 224 1024 --modes train infer --specs gka_small gka_small@compile=default \
               gka_small@compile=reduce-overhead 'gka_small@compile=default%GKA_COMPILE_CORE=0' \
               'gka_small@compile=reduce-overhead%GKA_COMPILE_CORE=0'
             run_stage compiled_deit 240 python3 benchmarks/ab.py --out "$OUT/compiled_deit" --rounds 3 \
               --sizes 224 1024 --modes train infer --specs deit_small_patch16_224 \
               deit_small_patch16_224@compile=default deit_small_patch16_224@compile=reduce-overhead ;;
    ab)      # interleaved A/B of kernel switches (runs drift ~10 % between stages); AB_ARGS: ab.py's flags
             run_stage ab 300 python3 benchmarks/ab.py --out "$OUT/ab" ${AB_ARGS:-} ;;
    v26)     # the state-pass defaults of KERNEL_NOTES v26 (two levels from 64 chunks, the pipelined increment scan)
             # against one level / two levels forced and the defaults before (one level, unpipelined), interleaved:
             # kernels from many short to few long sequences and at D = 128; then gka_small at 1024 / 2048 px
             run_stage v26_kernels 300 python3 benchmarks/ab.py --out "$OUT/v26_kernels" --rounds 5 \
               --variants default STATE_SCAN=1 STATE_SCAN=2 STATE_SCAN=1,SCAN_STAGES=1 \
               --shapes 256,196,6,64 16,4096,6,64 4,16384,6,64 1,65536,6,64 4,4096,16,128
             run_stage v26_models 240 python3 benchmarks/ab.py --out "$OUT/v26_models" --rounds 3 \
               --variants default STATE_SCAN=1,SCAN_STAGES=1 --shapes \
               --models gka_small --sizes 1024 2048 --modes infer train ;;
    v27)     # both streams' scans in one launch (the default since v27) against a launch each, and a deeper scan
             # pipeline, interleaved: kernels from many short to few long sequences; gka_small inference at 1024 /
             # 2048 px
             run_stage v27_kernels ${V27_LIMIT:-240} python3 benchmarks/ab.py --out "$OUT/v27_kernels" --rounds 3 \
               --variants default SCAN_PAIR=0 SCAN_STAGES=8 \
               --shapes 256,196,6,64 16,4096,6,64 4,16384,6,64 1,65536,6,64
             run_stage v27_models 150 python3 benchmarks/ab.py --out "$OUT/v27_models" --rounds 3 \
               --variants default SCAN_PAIR=0 SCAN_STAGES=8 --shapes \
               --models gka_small --sizes 1024 2048 --modes infer ;;
    regs)    # registers and spills of the forward solve and the fused backward under this machine's Triton and ptxas
             # (benchmarks/sm90_compile.py; the CPU machine's Triton is newer and may allocate differently)
             run_stage regs 420 python3 benchmarks/sm90_compile.py --kernel both --mode 6 ;;
    profile2048)  # where gka_small's inference time goes at 2048 px (the state passes' share grows with length)
             run_stage profile2048 90 python3 benchmarks/models.py --out "$OUT/profile2048" --profile gka_small \
               --img-size 2048 --modes infer ;;
    schedule) run_stage schedule 200 python3 benchmarks/gpu_kernels_check.py --only schedule,profile ;;
    fusedglue)  # the opt-in fused glue of the vision mixer (gka_vision/models/scan_qkv.py, merge_norm.py) against the
             # PyTorch glue in the same run (absolute times drift between machines)
             for glue in 0 1; do
               run_stage "glue$glue" 150 env GKA_FUSED_GLUE=$glue python3 benchmarks/models.py --out "$OUT/glue$glue" \
                 --budget-s 110 --models gka_small gka_small_alt --sizes 224 1024 2048
             done ;;
    statecap)  # the forward's cap on chunk states (kernels/triton/config.segment_length): inference memory vs speed;
               # measured 2026-11-29: 256 vs 64 MB (now the default), 32 and 16 MB = 64 at D = 64 (the program floor)
             for floor in 4096 2048 1024; do
               run_stage "statefloor$floor" 150 env GKA_TRITON_MIN_PROGRAMS=$floor python3 benchmarks/models.py \
                 --out "$OUT/statefloor$floor" --budget-s 90 --models gka_small deit_small_patch16_224 \
                 --sizes 1024 2048 --modes infer
             done ;;
    lm)      # two peak rates per model, best kept: attention preferred 1e-3 to 3e-3 in a CPU check (0.51 vs 0.40)
             run_stage mqar 330 python3 benchmarks/mqar.py --out "$OUT" --budget-s 290 --lr 1e-3 3e-3
             run_stage decode 150 python3 benchmarks/decode.py --out "$OUT" ;;
    demo)
      # The README's main job on the GPU. The machine has no internet: carry timm's train.py in .timm_scripts/
      # (git-ignored; python3 -m train_imagenet fetches it into the cache here, or `git show` it from the pinned
      # commit), i.e. call the device tool with carry=[".timm_scripts"].
      run_stage demo 240 env TIMM_TRAIN_SCRIPT="$PWD/.timm_scripts/train.py" python3 -m train_imagenet --demo ;;
    *) echo "unknown stage $s"; failed=$((failed + 1)) ;;
  esac
done
exit $failed
