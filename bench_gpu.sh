#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one run (sized for < 8 min on one H100/H200; not yet run on one): MicroDiT_XL_2
# at 512 px with the SDXL-VAE and DFN5B text-tower architectures (preset microdit-xl-512-random: random weights, the
# speed is the shapes'), bf16.
#   1. bench_model.py: DiT forward at batch 1 / 8, the 30-step guided teacher's s/image
#   2. bench_train.py: one CD step (full student, LoRA 32) at growing batch sizes until out of memory: s/step, MFU,
#      peak GiB (compare: python bench_memory.py)
#   3. generate_data.py: teacher data (30 steps, guidance 5), images/s
#   4. train.py: a short LoRA-32 distillation on that data (the whole script on the GPU), its s/step and peak memory
#   5. benchmark.py: end-to-end s/image of the teacher at 30 steps and the student at 1 / 2 / 4 steps
# OUT (default bench_gpu_out/) receives bench_gpu.md (every command, its output without progress bars, its wall time),
# train_log.jsonl and sampling_report.json.
#
#   bash bench_gpu.sh                                              # on the GPU machine (its OUT)
#   QUICK=1 DEVICE=cpu bash bench_gpu.sh                           # the same commands at tiny sizes (tests/test_xl.py)
#   QUICK=1 DEVICE=cpu PRESET=tiny-random bash bench_gpu.sh        # seconds (tests/test_xl.py, default suite)
#
# diffusers and open_clip_torch (and ftfy, wcwidth, importlib_metadata) are not on the lent GPU machines:
#   bash bench_gpu.sh --fetch-wheels        # here, where pip reaches PyPI: their wheels into .whl/ (git-ignored)
# and carry .whl with the run; they are installed from there when the folder exists.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = --fetch-wheels ]; then  # the GPU machine's Python is 3.12
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        "diffusers==$(python3 -c 'import diffusers; print(diffusers.__version__)')" \
        "open_clip_torch==$(python3 -c 'import open_clip; print(open_clip.__version__)')" ftfy wcwidth importlib_metadata
    ls -la .whl
    exit
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-bench_gpu_out}
PRESET=${PRESET:-microdit-xl-512-random}
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then DTYPE=${DTYPE:-fp32}; else DTYPE=${DTYPE:-bf16}; fi
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${QUICK:-0}" = 1 ]; then  # every command, at sizes a CPU runs in minutes
    FWD_BATCH="1 2"; SAMPLE_STEPS=2; REPEATS=1; CD_BATCH="1"; CD_RANKS="32"; GEN_NUM=2; GEN_STEPS=2; GEN_BATCH=2
    TRAIN_STEPS=2; TRAIN_BATCH=1; BENCH_PROMPTS=2; BENCH_BATCH=2; COMPARE=""
else
    FWD_BATCH="1 8"; SAMPLE_STEPS=30; REPEATS=10; CD_BATCH="8 16 32 48 64"; CD_RANKS="0 32"; GEN_NUM=64
    GEN_STEPS=30; GEN_BATCH=32; TRAIN_STEPS=20; TRAIN_BATCH=8; BENCH_PROMPTS=16; BENCH_BATCH=8; COMPARE="--compare-teacher"
fi
mkdir -p "$OUT"
RUN=$(mktemp -d)  # logs, teacher data and the student: large, not brought back
mkdir "$RUN/logs"
PROMPTS=$RUN/prompts.json
python3 - "$PROMPTS" "$GEN_NUM" <<'EOF'
import json, sys
few = ["a photograph of an astronaut riding a horse", "a bowl of ramen on a wooden table, studio lighting",
       "a watercolor painting of a lighthouse at sunset", "a red fox sitting in fresh snow, close-up",
       "a city street at night in the rain, neon signs", "a portrait of an old fisherman, dramatic light",
       "a bowl of fruit on a marble table, oil painting", "a snowy mountain range at dawn, aerial view"]
json.dump([f"{few[i % len(few)]}, variation {i}" for i in range(int(sys.argv[2]))], open(sys.argv[1], "w"))
EOF
run() {  # run NAME COMMAND...: the command's output to the terminal and RUN/logs/NAME.log, with its wall time
    local name=$1 log=$RUN/logs/$1.log start=$SECONDS
    shift
    printf '## %s\n\n    %s\n\n' "$name" "$*" > "$log"
    "$@" 2>&1 | tee -a "$log"
    printf '\n%s: %s s wall time\n\n' "$name" "$((SECONDS - start))" | tee -a "$log"
}
common=(--preset "$PRESET" --dtype "$DTYPE")
{ echo "# bench_gpu.sh: $PRESET, $DEVICE, $DTYPE, QUICK=${QUICK:-0}, $(date -u +%F)"; echo
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; echo; } \
    > "$RUN/logs/0_device.log" || true

run forward python3 bench_model.py --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --batch-size $FWD_BATCH \
    --steps "$SAMPLE_STEPS" --repeats "$REPEATS"
run cd_step python3 bench_train.py "${common[@]}" --device "$DEVICE" --lora-rank $CD_RANKS --batch-size $CD_BATCH \
    --repeats "$REPEATS"
run teacher_data python3 generate_data.py "${common[@]}" --device "$DEVICE" --prompts "$PROMPTS" --out "$RUN/data" \
    --steps "$GEN_STEPS" --batch-size "$GEN_BATCH"
cpu_flag=(); [ "$DEVICE" = cpu ] && cpu_flag=(--cpu)
run train python3 train.py "${common[@]}" "${cpu_flag[@]}" --data-dir "$RUN/data" --out-dir "$RUN/student" \
    --lora-rank 32 --grad-checkpointing --steps "$TRAIN_STEPS" --batch-size "$TRAIN_BATCH" --val-every 0 \
    --val-samples 2 --val-teacher-steps "$GEN_STEPS" --ckpt-every 0
cp "$RUN/student/log.jsonl" "$OUT/train_log.jsonl"
run sampling python3 benchmark.py "${common[@]}" --device "$DEVICE" --student "$RUN/student/student_lora.safetensors" \
    --labels student --steps 1 2 4 $COMPARE --prompts-file "$PROMPTS" \
    --num-prompts "$BENCH_PROMPTS" --batch-size "$BENCH_BATCH" --clip-model none --out "$RUN/bench"
cp "$RUN/bench/report.json" "$OUT/sampling_report.json"
for name in 0_device forward cd_step teacher_data train sampling; do  # progress bars dropped
    tr '\r' '\n' < "$RUN/logs/$name.log" | grep -v -e '%|' -e $'\e\\[A'
done > "$OUT/bench_gpu.md"
rm -rf "$RUN"
echo "bench_gpu.sh: done; figures in $OUT/bench_gpu.md"
