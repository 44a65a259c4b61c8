#!/usr/bin/env bash
# trichip on one GPU: the Llama-3.2-1B-shaped model (model=llama3.2-1b) in bf16, seq_len 2048, with each
# framework; prints tokens/s and MFU against the chip's dense bf16 peak, as a Markdown table (also written
# to $OUT/accelerator.md and $OUT/accelerator.jsonl when OUT is set).
#
#   bash bench/accelerator.sh                       # from anywhere; installs what is missing first
#   NO_INSTALL=1 bash bench/accelerator.sh          # use the Python environment as it is
#   GLOBAL=32 MICRO=8 STEPS=30 FRAMEWORKS="jax torch" PEAK_TFLOPS=989 bash bench/accelerator.sh
#
# Knobs (environment): PYTHON (python3), STEPS (30; the first WARMUP=3 are left out of the medians),
# SEQ (2048), GLOBAL (32 sequences = 65,536 tokens a step), MICRO (8; halved on out-of-memory down to 1,
# same global batch), FRAMEWORKS ("jax torch"), MODEL (llama3.2-1b), PRECISION (bf16; fp32; fp8 on H100/H200/
# B200/L40S: float8 projections in the blocks, torch through torchao, installed from a wheel in .whl/ when
# missing, even with NO_INSTALL=1), PEAK_TFLOPS (the chip's dense peak in that precision; detected from
# nvidia-smi for H100/H200/A100/L40S/B200; fp8 runs also report MFU against the bf16 peak, BF16_PEAK_TFLOPS),
# PLATFORM (gpu; cpu with MODEL=tiny tries the script out without a GPU), COMPILE (1: torch.compile each block
# for torch), ATTENTION (auto: cuDNN flash attention for JAX on GPUs in bf16; a JAX run whose cuDNN attention
# fails for another reason than memory is rerun once with xla), SAVE_AT (0; N > 0: an async checkpoint save
# after step N, reported as the time it blocked the loop and when it was committed).
# The timed path is bench/accel_step.py: TokenData batch -> backend.train_step (as trainer/loop.py runs it),
# without the loop's metrics file and final checkpoint (~15 GB for this model).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${STEPS:-30}; WARMUP=${WARMUP:-3}; SEQ=${SEQ:-2048}; GLOBAL=${GLOBAL:-32}; MICRO=${MICRO:-8}
FRAMEWORKS=${FRAMEWORKS:-"jax torch"}; MODEL=${MODEL:-llama3.2-1b}; PRECISION=${PRECISION:-bf16}
PLATFORM=${PLATFORM:-gpu}; COMPILE=${COMPILE:-1}; ATTENTION=${ATTENTION:-auto}; SAVE_AT=${SAVE_AT:-0}
# JAX takes 75% of GPU memory by default; the 1B state alone (fp32 params + AdamW) is ~15 GB
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TRICHIP_CACHE=${TRICHIP_CACHE:-${TMPDIR:-/tmp}/trichip-cache}

say() { echo "[accelerator] $*" >&2; }

# ---- environment: a CUDA torch, jax[cuda12], trichip's own requirements ---------------------------------
have() { "$PY" - "$@" <<'EOF' 2>/dev/null
import sys
want = sys.argv[1:]
import importlib
for m in ("numpy", "flax", "optax", "orbax.checkpoint", "safetensors"):
    importlib.import_module(m)
if "torch" in want:
    import torch
    assert torch.cuda.is_available() or "cpu" in want
if "jax" in want:
    import jax
    assert jax.default_backend() in ("gpu", "cuda", "rocm") or "cpu" in want
EOF
}
need=(); for fw in $FRAMEWORKS; do need+=("$fw"); done
[ "$PLATFORM" = cpu ] && need+=(cpu)
if ! have "${need[@]}"; then
    if [ "${NO_INSTALL:-0}" = 1 ]; then
        say "missing packages or no GPU visible to them, and NO_INSTALL=1: stopping"; exit 2
    fi
    say "installing: torch (CUDA build from PyPI), jax[cuda12], trichip[all]"
    "$PY" -m pip install -q --upgrade torch 'jax[cuda12]' || exit 2
    "$PY" -m pip install -q -e '.[all]' || exit 2
    have "${need[@]}" || { say "after installing, torch/jax still see no GPU (nvidia-smi below)"; nvidia-smi || true; exit 2; }
fi

# ---- torchao for torch in fp8: from a local wheel (.whl/, for a box without internet), else from the index ---
if [ "$PRECISION" = fp8 ] && [[ " $FRAMEWORKS " == *" torch "* ]] && ! "$PY" -c "import torchao" 2>/dev/null; then
    wheel=$(ls .whl/torchao-*.whl 2>/dev/null | tail -1)
    if [ -n "$wheel" ]; then
        say "installing $wheel (--no-deps: torch stays as it is)"
        "$PY" -m pip install -q --no-deps --no-index "$wheel" || say "torchao did not install: the torch fp8 run will say so"
    elif [ "${NO_INSTALL:-0}" != 1 ]; then
        "$PY" -m pip install -q --no-deps 'torchao>=0.18' || say "torchao did not install: the torch fp8 run will say so"
    fi
fi

# ---- the chip and its peak --------------------------------------------------------------------------------
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU_MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader 2>/dev/null | head -1)
if [ -z "${PEAK_TFLOPS:-}" ]; then
    case "$PRECISION:$GPU_NAME" in   # dense (no sparsity) tensor-core peaks, SXM parts unless named
        fp8:*H200*|fp8:*GH200*) PEAK_TFLOPS=1979 ;;
        fp8:*H100*PCIe*) PEAK_TFLOPS=1513 ;;
        fp8:*H100*NVL*) PEAK_TFLOPS=1671 ;;
        fp8:*H100*) PEAK_TFLOPS=1979 ;;
        fp8:*B200*) PEAK_TFLOPS=4500 ;;
        fp8:*L40S*) PEAK_TFLOPS=733 ;;
        bf16:*H200*|bf16:*GH200*) PEAK_TFLOPS=989 ;;
        bf16:*H100*PCIe*) PEAK_TFLOPS=756 ;;
        bf16:*H100*NVL*) PEAK_TFLOPS=835 ;;
        bf16:*H100*) PEAK_TFLOPS=989 ;;
        bf16:*B200*) PEAK_TFLOPS=2250 ;;
        bf16:*A100*) PEAK_TFLOPS=312 ;;
        bf16:*L40S*) PEAK_TFLOPS=362 ;;
        fp32:*H100*|fp32:*H200*) PEAK_TFLOPS=67 ;;    # fp32 non-tensor-core; trichip fp32 disables TF32
        fp32:*A100*) PEAK_TFLOPS=19.5 ;;
        *) PEAK_TFLOPS="" ;;
    esac
fi
if [ -z "${BF16_PEAK_TFLOPS:-}" ]; then
    case "$GPU_NAME" in
        *H200*|*GH200*) BF16_PEAK_TFLOPS=989 ;;
        *H100*PCIe*) BF16_PEAK_TFLOPS=756 ;;
        *H100*NVL*) BF16_PEAK_TFLOPS=835 ;;
        *H100*) BF16_PEAK_TFLOPS=989 ;;
        *B200*) BF16_PEAK_TFLOPS=2250 ;;
        *A100*) BF16_PEAK_TFLOPS=312 ;;
        *L40S*) BF16_PEAK_TFLOPS=362 ;;
        *) BF16_PEAK_TFLOPS="" ;;
    esac
fi
[ "$PRECISION" = bf16 ] && [ -n "${PEAK_TFLOPS:-}" ] && BF16_PEAK_TFLOPS=$PEAK_TFLOPS
say "device: ${GPU_NAME:-none seen by nvidia-smi} ${GPU_MEM:+($GPU_MEM)}; $PRECISION peak: ${PEAK_TFLOPS:-unknown (set PEAK_TFLOPS)} TFLOP/s; bf16 peak: ${BF16_PEAK_TFLOPS:-unknown} TFLOP/s"

# ---- runs ---------------------------------------------------------------------------------------------------
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; RESULTS=$OUT/accelerator.jsonl; : > "$RESULTS"; else RESULTS=$(mktemp); fi
for fw in $FRAMEWORKS; do
    micro=$MICRO; attention=$ATTENTION; extra=()
    [ "$fw" = torch ] && [ "$COMPILE" = 1 ] && extra+=(--compile)
    while :; do
        say "$fw: $MODEL $PRECISION, seq_len $SEQ, global batch $GLOBAL, micro-batch $micro, $STEPS steps"
        line=$("$PY" bench/accel_step.py --framework "$fw" --model "$MODEL" --precision "$PRECISION" \
                 --seq-len "$SEQ" --global-batch "$GLOBAL" --micro-batch "$micro" --steps "$STEPS" \
                 --warmup "$WARMUP" --platform "$PLATFORM" ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"} \
                 ${BF16_PEAK_TFLOPS:+--bf16-peak-tflops "$BF16_PEAK_TFLOPS"} \
                 --attention "$attention" --save-at "$SAVE_AT" ${extra[@]+"${extra[@]}"} \
               | grep '^RESULT ' | tail -1)
        line=${line#RESULT }
        if [ -z "$line" ]; then
            line="{\"framework\": \"$fw\", \"ok\": false, \"error\": \"no result (crashed)\", \"micro_batch\": $micro}"
        fi
        if echo "$line" | grep -q '"oom": true' && [ "$micro" -gt 1 ]; then
            say "$fw: out of memory at micro-batch $micro; retrying with $((micro / 2))"
            micro=$((micro / 2)); continue
        fi
        if [ "$fw" = jax ] && [ "$attention" = auto ] && echo "$line" | grep -q '"ok": false'; then
            say "jax: failed with attention=auto (cuDNN on GPUs): $(echo "$line" | grep -o '"error": "[^"]*"'); retrying with xla"
            echo "$line" >> "$RESULTS"; attention=xla; continue
        fi
        echo "$line" >> "$RESULTS"; break
    done
done

# ---- table ----------------------------------------------------------------------------------------------------
TABLE=$("$PY" - "$RESULTS" "${GPU_NAME:-?}" "${PEAK_TFLOPS:-}" "${BF16_PEAK_TFLOPS:-}" <<'EOF'
import json, sys, datetime
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gpu, peak, bf16_peak = sys.argv[2], sys.argv[3], sys.argv[4]
out = [f"### trichip on {gpu}: {rows[0].get('model', '?') if rows else '?'}, {datetime.date.today()}", "",
       "| framework | precision | compile / attention | seq_len | global batch | micro-batch | step s (median) | tokens/s | TFLOP/s | "
       f"MFU vs {peak or '?'} TFLOP/s | MFU vs bf16 {bf16_peak or '?'} TFLOP/s | peak memory GB | first step s | loss first -> last | async save: blocked (share of a step), steps beside, committed after | error |",
       "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
f = lambda x, s="{:.2f}": "-" if x is None else s.format(x)
save = lambda r: (f"{r['save_block_s']:.3f} s ({100 * r['save_block_s'] / r['step_s']:.1f}%), "
                  f"{r.get('save_steps_beside', 0)} steps at {r.get('save_step_beside_s', 0):.3f} s, "
                  f"{r.get('save_commit_s', 0):.1f} s") if r.get("save_block_s") is not None and r.get("step_s") else "-"
how = lambda r: ("torch.compile" if r.get("compile") else "eager") if r.get("framework") == "torch" else (r.get("attention") or "-")
for r in rows:
    if r.get("ok"):
        out.append(f"| {r['framework']} | {r['precision']} | {how(r)} | {r['seq_len']} | {r['global_batch']} | {r['micro_batch']} | "
                   f"{f(r['step_s'], '{:.3f}')} | {f(r['tokens_per_s'], '{:,.0f}')} | {f(r['tflops'], '{:.0f}')} | "
                   f"{f(r['mfu'] and 100 * r['mfu'], '{:.1f}%')} | {f(r.get('mfu_bf16') and 100 * r['mfu_bf16'], '{:.1f}%')} | "
                   f"{f(r.get('peak_mem_gb'), '{:.1f}')} | "
                   f"{f(r['first_step_s'], '{:.0f}')} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {save(r)} | |")
    else:
        out.append(f"| {r.get('framework')} | {r.get('precision', '-')} | {how(r)} | {r.get('seq_len', '-')} | "
                   f"{r.get('global_batch', '-')} | {r.get('micro_batch', '-')} | - | - | - | - | - | - | - | - | - | "
                   f"{r.get('error', '?')} |")
if rows and rows[0].get("ok"):
    r = rows[0]
    out += ["", f"{r['params'] / 1e9:.2f}B parameters; {r['flops_per_token'] / 1e9:.2f} GFLOP/token "
            "(models.spec.flops_per_token: 6N + attention). Steps driven as trainer/loop.py drives them "
            f"(bench/accel_step.py); medians after the warm-up steps. MFU against the chip's dense {r['precision']} peak, "
            "and against its dense bf16 peak (the same figure in bf16; it compares fp8 runs with bf16 ones)."]
print("\n".join(out))
EOF
)
echo "$TABLE"
if [ -n "${OUT:-}" ]; then
    echo "$TABLE" > "$OUT/accelerator.md"
    say "wrote $OUT/accelerator.md and $OUT/accelerator.jsonl"
else
    rm -f "$RESULTS"
fi
