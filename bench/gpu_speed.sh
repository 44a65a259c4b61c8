#!/usr/bin/env bash
# The speed checks of one GPU in one call, for a short lease: each part writes under $OUT as it ends, the most
# important first, and a part starts only while the time left of BUDGET seconds (from the start) allows it.
#
#   OUT=/tmp/speed BUDGET=540 bash bench/gpu_speed.sh
#   PLATFORM=cpu MODEL=tiny SEQ=128 GLOBAL=8 MICRO=4 STEPS=6 EVERY=3 BUDGET=900 bash bench/gpu_speed.sh  # try it on a CPU
#
# 1. restart.jsonl / restart.md, steps.md: per framework bench/restart.py --lean (MODEL, bf16, SEQ, GLOBAL,
#    MICRO; torch with hal.compile=true): a fresh run of STEPS steps with a checkpoint every EVERY steps (its
#    goodput, after warm-up too; its MFU and the steps beside each async save, from its metrics.jsonl), then
#    that run resumed on the compile cache it filled (restart to first step, the restore of the checkpoint).
# 2. fp8.md: bench/accelerator.sh PRECISION=fp8 against PRECISION=bf16, both frameworks, a few steps, no save.
# 3. micro16.md: bench/accelerator.sh bf16 at micro-batch GLOBAL (no accumulation: what the chunked loss frees).
# 4. stall.md: bench/save_stall_trace.py per framework: the steps beside an async save under the profiler, the
#    busy time of every thread and device stream in that window (what those steps wait for).
# Python packages the image lacks travel as wheels in .whl/ (git-ignored; carried to the machine), installed first:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
#       --platform manylinux_2_28_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1 tensorboardX torchao==0.18.0
#   (antlr4-python3-runtime==4.9.3 comes as a source archive: `pip wheel --no-deps -w .whl` it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-speed}; BUDGET=${BUDGET:-540}; PLATFORM=${PLATFORM:-gpu}
MODEL=${MODEL:-llama3.2-1b}; SEQ=${SEQ:-2048}; GLOBAL=${GLOBAL:-16}; MICRO=${MICRO:-8}; STEPS=${STEPS:-41}
EVERY=${EVERY:-20}; PRECISION=${PRECISION:-bf16}; FRAMEWORKS=${FRAMEWORKS:-"jax torch"}
WORK=${WORK:-${TMPDIR:-/tmp}/trichip-gpu-speed}
export PYTHONUNBUFFERED=1 TRICHIP_CACHE=${TRICHIP_CACHE:-$WORK/cache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT" "$WORK"
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[gpu_speed $((SECONDS - START))s] $*" >&2; }

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" || say "installing .whl/ failed"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF' 2>&1
import importlib
for m in ("torch", "jax", "flax", "optax", "orbax.checkpoint", "hydra", "torchao"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:      # noqa: BLE001
        print(m, "missing:", str(e).splitlines()[0][:120])
EOF
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

# ---- 1. restart and goodput: two launch.train processes per framework ----------------------------------------
for fw in $FRAMEWORKS; do
    [ "$(left)" -lt 150 ] && { say "skipping $fw restart/goodput: $(left)s left"; continue; }
    extra=(hal.platform="$PLATFORM" trainer.keep_checkpoints=1 trainer.eval_every=0 trainer.log_every=1)
    [ "$fw" = torch ] && [ "$PLATFORM" = gpu ] && extra+=(hal.compile=true)
    say "$fw: restart and goodput, $MODEL $PRECISION seq $SEQ batch $GLOBAL/$MICRO, $STEPS steps, a checkpoint every $EVERY"
    rm -rf "$WORK/$fw"
    timeout $(( $(left) - 20 )) "$PY" bench/restart.py --lean --model "$MODEL" --frameworks "$fw" --steps "$STEPS" \
        --checkpoint-every "$EVERY" --resume-steps 3 --precision "$PRECISION" --seq-len "$SEQ" \
        --global-batch "$GLOBAL" --micro-batch "$MICRO" --workdir "$WORK" --out "$OUT/restart.jsonl" "${extra[@]}" \
        >> "$OUT/restart.md" 2> "$OUT/restart-$fw.log" || say "$fw restart.py failed (restart-$fw.log)"
    "$PY" - "$WORK/$fw/goodput/metrics.jsonl" "$fw" "$EVERY" >> "$OUT/steps.md" <<'EOF' 2>&1
import json, statistics, sys
path, fw, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(path) if l.strip()]
steps = {r["step"]: r for r in rows if "step_time_s" in r}
saves = [s for s in steps if s % every == 0 and s + 1 in steps]
beside = {s + i for s in saves for i in (1, 2, 3)}
alone = [steps[s]["step_time_s"] for s in steps if s > 2 and s not in beside]
med = statistics.median(alone)
mfu = statistics.median(steps[s]["mfu"] for s in steps if s > 2 and "mfu" in steps[s]) if any("mfu" in r for r in rows) else None
print(f"| {fw} | {med:.3f} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
      + ", ".join(f"{s}: " + " ".join(f"{steps[s + i]['step_time_s'] / med:.2f}x" for i in (1, 2, 3) if s + i in steps)
                  for s in saves) + " |")
EOF
    rm -rf "$WORK/$fw"      # its checkpoints (~15 GB each for the 1B shape)
done
sed -i '1i | framework | step s (median, not beside a save) | MFU | steps 1-3 after each async save, x the median |\n|---|---|---|---|' "$OUT/steps.md" 2>/dev/null

# ---- 2. fp8 against bf16 ----------------------------------------------------------------------------------------
acc() {   # name, then environment for accelerator.sh
    local name=$1; shift
    [ "$(left)" -lt 100 ] && { say "skipping $name: $(left)s left"; return; }
    say "accelerator.sh: $name ($*)"
    env NO_INSTALL=1 PLATFORM="$PLATFORM" MODEL="$MODEL" SEQ="$SEQ" GLOBAL="$GLOBAL" MICRO="$MICRO" \
        FRAMEWORKS="$FRAMEWORKS" OUT="$WORK/acc" "$@" \
        timeout $(( $(left) - 10 )) bash bench/accelerator.sh > /dev/null 2> "$OUT/$name.log" \
        && cp "$WORK/acc/accelerator.md" "$OUT/$name.md" || say "$name failed ($name.log)"
}
acc fp8 PRECISION=fp8 STEPS=8 WARMUP=3
acc bf16 PRECISION=bf16 STEPS=8 WARMUP=3
# ---- 3. the micro-batch the chunked loss frees ------------------------------------------------------------------
acc micro16 PRECISION=bf16 STEPS=8 WARMUP=3 MICRO="$GLOBAL"
# ---- 4. what the steps beside an async save wait for: a profiler trace of them, summarised per thread/stream ----
for fw in $FRAMEWORKS; do
    [ "$(left)" -lt 150 ] && { say "skipping the $fw save-stall trace: $(left)s left"; continue; }
    say "$fw: profiler trace of the steps beside an async save"
    timeout $(( $(left) - 20 )) "$PY" bench/save_stall_trace.py --framework "$fw" --model "$MODEL" \
        --precision "$PRECISION" --platform "$PLATFORM" --seq-len "$SEQ" --global-batch "$GLOBAL" --micro-batch "$MICRO" \
        --out "$WORK/stall" >> "$OUT/stall.md" 2> "$OUT/stall-$fw.log" || say "$fw save_stall_trace.py failed (stall-$fw.log)"
done
say "done; $(left)s of the budget left"
ls -la "$OUT" >&2
