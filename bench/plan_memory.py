"""Predicted (launch.planner.memory) vs measured per-device memory of trichip's sharded train steps.

    python bench/plan_memory.py [--model small] [--devices 1,2,4,8] [--cases "8,256,fp32,0 8,256,bf16,1"]
                                [--save measured.json | --load measured.json]
    python bench/plan_memory.py --framework torch --devices 1,2,4 --cases "8,256,fp32,0 8,256,bf16,0"
    python bench/plan_memory.py --model llama3.2-1b@2 --devices 1 --cases "2,1024,fp32,0" --loss-chunk 512

Every step is measured and predicted at one trainer.loss_chunk (--loss-chunk, the trainer's default unless
given; 0: the loss through the whole logits). MODEL is a models.spec.SIZES name, or NAME@LAYERS for that
model with LAYERS decoder layers: llama3.2-1b@2 has the 128,256-token vocabulary whose logits the chunked
loss exists for, at a size the CPU compiles quickly.

torch: the TorchBackend step on N gloo processes (torchrun; FSDP2 from 2 on), the peak of every tensor
storage alive on rank 0 during one train step, by kind, from torch.distributed._tools' MemTracker
(FSDPMemTracker under FSDP2).

JAX:
each (devices, case, variant) compiles in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N:
the JAX backend (hal.make_backend, the mesh hal/mesh.py chooses) lowers and compiles its train step, and the
measured peak is XLA's compiled.memory_analysis(): arguments + outputs - aliased + temporaries, per device.
Variants (columns):

- `default`: the step as the trainer compiles it on the CPU. XLA:CPU's default scheduler is its
  concurrency-optimized one, which orders independent operations for parallelism, not memory.
- `memory`: the same step under XLA's memory-minimizing scheduler
  (--xla_cpu_enable_concurrency_optimized_scheduler=false), the kind of schedule XLA's TPU and GPU
  compilers aim for under their memory limit; the planner predicts this one.
- `fsdp` (2+ devices): `memory`, with each decoder layer's input and output constrained to the batch
  sharding over (data, fsdp). Without that constraint XLA's sharding propagation shards the activations'
  hidden dimension over fsdp (from the weights' `embed` axis) and all-reduces full-batch MLP activations;
  with it the step is the FSDP the planner models (weights gathered, activations split by rows).

The prediction uses platform="cpu" (XLA:CPU keeps bf16 elementwise results in float32). Prints a Markdown
table; the goal is every predicted / measured within 15% on the column the planner models (`fsdp` on 2+
devices, `memory` on one); remat rows are shown but are no check (see bench/RESULTS.md).
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

from configs.schema import TrainerConfig  # noqa: E402

VARIANTS = ("default", "memory", "fsdp")
DEFAULT_LOSS_CHUNK = TrainerConfig.loss_chunk    # the trainer's default: the step as a run compiles it


def constrain_layer_boundaries(mesh) -> None:
    """Wrap models.llama_jax.DecoderLayer so its input and output carry the batch sharding."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import models.llama_jax as llama
    rows = NamedSharding(mesh, P(("data", "fsdp"), None, None))
    layer_call = llama.DecoderLayer.__call__

    def constrained(self, x, cos, sin, mask=None):
        x = jax.lax.with_sharding_constraint(x, rows)
        return jax.lax.with_sharding_constraint(layer_call(self, x, cos, sin, mask), rows)
    llama.DecoderLayer.__call__ = constrained


def model_config(model: str):
    """models.spec.SIZES[name], or NAME@LAYERS: that model with LAYERS decoder layers (a large vocabulary at a
    size the CPU compiles and runs quickly)."""
    import dataclasses
    from models.spec import SIZES
    name, _, layers = model.partition("@")
    cfg = SIZES[name]
    return dataclasses.replace(cfg, num_hidden_layers=int(layers)) if layers else cfg


def measure_child(model: str, micro: int, seq: int, precision: str, remat: bool, variant: str,
                  loss_chunk: int) -> dict:
    import jax
    import numpy as np
    from hal import OptimizerSpec, make_backend
    from models.spec import nest, param_shapes
    cfg = model_config(model)
    b = make_backend({"framework": "jax", "platform": "cpu"}, cfg, OptimizerSpec(), precision, remat,
                     loss_chunk=loss_chunk)
    if variant == "fsdp":   # the layers are traced at lower(), after the backend built its mesh
        constrain_layer_boundaries(b.mesh)
    params = nest({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in param_shapes(cfg).items()})
    opt = jax.eval_shape(b.tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, micro, seq + 1), np.int32)
    m = b._train_step.lower(params, opt, tokens, np.float32(0.1)).compile().memory_analysis()
    fields = {k: getattr(m, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}
    peak = fields["argument"] + fields["output"] - fields["alias"] + fields["temp"]
    return {"mesh": b.mesh_sizes, "measured": peak, **fields}


def measure_torch_child(model: str, micro: int, seq: int, precision: str, remat: bool, loss_chunk: int) -> dict:
    """Peak tensor bytes of this process over one TorchBackend.train_step (the second: AdamW creates its
    moments in the first), from torch's MemTracker (FSDPMemTracker under FSDP2): every tensor storage
    alive, by kind (parameters, gradients, optimizer state, activations, temporaries)."""
    import numpy as np
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from hal import OptimizerSpec, make_backend
    from hal.base import HostState
    from models.spec import reference_init
    cfg = model_config(model)
    b = make_backend({"framework": "torch", "platform": "cpu"}, cfg, OptimizerSpec(), precision, remat,
                     loss_chunk=loss_chunk)
    b.check_batch(micro)
    b.set_state(HostState.fresh(reference_init(cfg, 0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, micro, seq + 1), dtype=np.int32)
    b.train_step(tokens, 1e-4)
    if b.fsdp:
        tracker = FSDPMemTracker(b.net, b.opt)
    else:
        tracker = MemTracker()
        tracker.track_external(b.net, b.opt)
    with tracker:
        b.train_step(tokens, 1e-4)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {"mesh": b.mesh_sizes, "measured": peak["Total"],
            "by_kind": {str(k): v for k, v in peak.items() if k != "Total" and v}}


def measure_torch(model: str, n: int, case: str, loss_chunk: int = DEFAULT_LOSS_CHUNK) -> dict | str:
    """The torch step on n gloo processes (torchrun on this host); rank 0's peak (every rank holds the same
    shapes)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--torch-child", model, *case.split(","), str(loss_chunk)]
    env = dict(os.environ, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else f"failed: {r.stderr.strip().splitlines()[-1:]}"


def measure(model: str, n: int, case: str, variant: str, loss_chunk: int = DEFAULT_LOSS_CHUNK) -> dict | str:
    flags = [f"--xla_force_host_platform_device_count={n}"]
    if variant != "default":
        flags.append("--xla_cpu_enable_concurrency_optimized_scheduler=false")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, __file__, "--child", model, *case.split(","), variant, str(loss_chunk)],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else f"failed: {r.stderr.strip().splitlines()[-1:]}"


def table(results: list[dict]) -> None:
    from launch.planner import memory
    print("| model | devices | mesh d/f/t | micro-batch | seq | precision | remat | loss_chunk | predicted MB | "
          "measured MB: default / memory / fsdp | predicted / measured (modelled column) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        micro, seq, precision, remat = r["case"].split(",")
        got = {v: r[v] for v in VARIANTS if isinstance(r.get(v), dict)}
        if not got:
            print(f"| {r['model']} | {r['devices']} | {r.get('default')} |")
            continue
        mesh = next(iter(got.values()))["mesh"]
        chunk = r.get("loss_chunk", 0)     # measurements saved before the chunked loss took the whole logits
        pred = sum(memory(model_config(r["model"]), mesh, "jax", int(micro), int(seq), precision, remat == "1",
                          "materialized", platform="cpu", loss_chunk=chunk).values())
        checked = "fsdp" if r["devices"] > 1 else "memory"
        cols = " / ".join(f"{got[v]['measured'] / 1e6:,.1f}" if v in got else "-" for v in VARIANTS)
        ratio = f"{pred / got[checked]['measured']:.3f}" if checked in got else "-"
        note = " (no check: remat)" if remat == "1" else ""
        print(f"| {r['model']} | {r['devices']} | {mesh['data']}/{mesh['fsdp']}/{mesh['tensor']} | {micro} | {seq} | "
              f"{precision} | {'on' if remat == '1' else 'off'} | {chunk} | {pred / 1e6:,.1f} | {cols} | {ratio}{note} |",
              flush=True)


def torch_table(results: list[dict]) -> None:
    from launch.planner import memory
    print("| model | processes | mesh d/f/t | micro-batch | seq | precision | loss_chunk | predicted MB | measured MB | "
          "measured by kind (MB) | predicted / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        micro, seq, precision, remat = r["case"].split(",")
        got = r["torch"]
        if not isinstance(got, dict):
            print(f"| {r['model']} | {r['devices']} | {got} |")
            continue
        mesh = got["mesh"]
        # torch's scaled_dot_product_attention runs a fused flash kernel on the CPU (no mask): no scores kept
        chunk = r.get("loss_chunk", 0)
        pred = sum(memory(model_config(r["model"]), mesh, "torch", int(micro), int(seq), precision, remat == "1",
                          "flash", platform="cpu", loss_chunk=chunk).values())
        kinds = ", ".join(f"{k.split('.')[-1].lower()} {v / 1e6:,.1f}" for k, v in got["by_kind"].items())
        print(f"| {r['model']} | {r['devices']} | {mesh['data']}/{mesh['fsdp']}/{mesh['tensor']} | {micro} | {seq} | "
              f"{precision} | {chunk} | {pred / 1e6:,.1f} | {got['measured'] / 1e6:,.1f} | {kinds} | "
              f"{pred / got['measured']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--cases", default="8,256,fp32,0 8,256,bf16,0 16,128,bf16,0 8,256,bf16,1",
                    help="micro_batch,seq_len,precision,remat ...")
    ap.add_argument("--save", help="write the measurements here (JSON)")
    ap.add_argument("--load", help="print the table for measurements saved with --save")
    ap.add_argument("--framework", default="jax", choices=("jax", "torch"))
    ap.add_argument("--loss-chunk", type=int, default=DEFAULT_LOSS_CHUNK,
                    help="trainer.loss_chunk of the measured step (0: the loss through the whole logits)")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--torch-child", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_child:
        model, micro, seq, precision, remat, loss_chunk = a.torch_child
        got = measure_torch_child(model, int(micro), int(seq), precision, remat == "1", int(loss_chunk))
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(got), flush=True)
        return
    if a.child:
        model, micro, seq, precision, remat, variant, loss_chunk = a.child
        print("RESULT " + json.dumps(measure_child(model, int(micro), int(seq), precision, remat == "1", variant,
                                                   int(loss_chunk))))
        return
    if a.load:
        results = json.loads(Path(a.load).read_text())
        (torch_table if "torch" in results[0] else table)(results)
        return
    results = []
    if a.framework == "torch":
        for case in a.cases.split():
            for n in map(int, a.devices.split(",")):
                results.append({"model": a.model, "devices": n, "case": case, "loss_chunk": a.loss_chunk,
                                "torch": measure_torch(a.model, n, case, a.loss_chunk)})
                if a.save:
                    Path(a.save).write_text(json.dumps(results, indent=1))
        torch_table(results)
        return
    for case in a.cases.split():
        for n in map(int, a.devices.split(",")):
            row = {"model": a.model, "devices": n, "case": case, "loss_chunk": a.loss_chunk}
            for variant in VARIANTS:
                if variant != "fsdp" or n > 1:
                    row[variant] = measure(a.model, n, case, variant, a.loss_chunk)
            results.append(row)
            if a.save:
                Path(a.save).write_text(json.dumps(results, indent=1))
    table(results)


if __name__ == "__main__":
    main()
