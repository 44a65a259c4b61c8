"""Predicted (launch.planner.memory) vs measured per-device memory of trichip's real sharded JAX train step.

    python bench/plan_memory.py [--model small] [--cases "8,256,fp32,0 8,256,bf16,0 8,256,bf16,1"]

Each (devices, case) runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N: the JAX
backend (hal.make_backend, the mesh hal/mesh.py chooses) lowers and compiles its train step, and the measured
peak is XLA's compiled.memory_analysis(): arguments + outputs - aliased + temporaries, per device.
Prints a Markdown table; the goal is every ratio within 15%.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure_child(model: str, micro: int, seq: int, precision: str, remat: bool) -> dict:
    import jax
    import numpy as np
    from hal import OptimizerSpec, make_backend
    from models.spec import SIZES, nest, param_shapes
    cfg = SIZES[model]
    b = make_backend({"framework": "jax", "platform": "cpu"}, cfg, OptimizerSpec(), precision, remat)
    params = nest({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in param_shapes(cfg).items()})
    opt = jax.eval_shape(b.tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, micro, seq + 1), np.int32)
    m = b._train_step.lower(params, opt, tokens, np.float32(0.1)).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"mesh": b.mesh_sizes, "measured": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--cases", default="8,256,fp32,0 8,256,bf16,0 16,128,bf16,0 8,256,bf16,1",
                    help="micro_batch,seq_len,precision,remat ...")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        model, micro, seq, precision, remat = a.child
        print("RESULT " + json.dumps(measure_child(model, int(micro), int(seq), precision, remat == "1")))
        return
    from launch.planner import memory
    from models.spec import SIZES
    print("| model | devices | mesh d/f/t | micro-batch | seq | precision | remat | predicted MB | measured MB | "
          "predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in a.cases.split():
        micro, seq, precision, remat = case.split(",")
        for n in map(int, a.devices.split(",")):
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
            r = subprocess.run([sys.executable, __file__, "--child", a.model, micro, seq, precision, remat],
                               env=env, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if not line:
                print(f"| {a.model} | {n} | failed: {r.stderr.strip().splitlines()[-1:]} |")
                continue
            got = json.loads(line[7:])
            mesh = got["mesh"]
            pred = sum(memory(SIZES[a.model], mesh, "jax", int(micro), int(seq), precision, remat == "1",
                              "materialized").values())
            print(f"| {a.model} | {n} | {mesh['data']}/{mesh['fsdp']}/{mesh['tensor']} | {micro} | {seq} | "
                  f"{precision} | {'on' if remat == '1' else 'off'} | {pred / 1e6:,.1f} | {got['measured'] / 1e6:,.1f} | "
                  f"{pred / got['measured']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
