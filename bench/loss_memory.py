"""Peak memory of one train step on the CPU with the loss through the whole logits (trainer.loss_chunk=0) and
chunked (trainer.loss_chunk=N), both frameworks, as a Markdown table.

    python bench/loss_memory.py                       # small and a 2-layer 1B-shaped model, chunks of 512 tokens
    python bench/loss_memory.py --loss-chunk 1024 --layers 4

Each measurement runs in a process of its own, float32, one micro-batch (no accumulation):
- JAX: XLA's memory analysis of the compiled train step (`temp_size_in_bytes`: activations, gradients, logits,
  everything but the arguments and outputs); nothing is run.
- torch: one step from a state with AdamW moments already made (so the step allocates no optimizer state), the
  process's peak RSS during it (VmHWM, reset through /proc/self/clear_refs just before) minus its RSS before it;
  glibc's mmap threshold is fixed at 128 KiB in that process, so freed buffers leave the RSS at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hal import HostState, OptimizerSpec, make_backend  # noqa: E402
from models.spec import SIZES, LlamaConfig, nest, param_shapes  # noqa: E402

MIB = 2 ** 20


def models(layers: int) -> dict[str, tuple[LlamaConfig, int, int, tuple]]:
    """{row name: (config, micro-batch rows, seq_len, frameworks)}. The larger batch is JAX's only: its number
    comes from the compiler, a torch step of it takes minutes on a small CPU."""
    one_b = dataclasses.replace(SIZES["llama3.2-1b"], num_hidden_layers=layers)
    one_b_name = f"1B-shaped, {layers} layers (hidden 2048, vocab 128256, tied)"
    return {"small (vocab 257)": (SIZES["small"], 8, 256, ("jax", "torch")),
            one_b_name: (one_b, 2, 1024, ("jax", "torch")),
            one_b_name + ", 8 rows": (one_b, 8, 1024, ("jax",))}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def jax_step_bytes(backend, cfg: LlamaConfig, micro: int, seq: int) -> int:
    import jax
    import numpy as np
    params = nest({k: jax.ShapeDtypeStruct(s, np.float32) for k, s in param_shapes(cfg).items()})
    opt = jax.eval_shape(backend.tx.init, params)
    tokens = jax.ShapeDtypeStruct((1, micro, seq + 1), np.int32)
    compiled = backend._train_step.lower(params, opt, tokens, np.float32(0.0)).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def torch_step_bytes(backend, cfg: LlamaConfig, micro: int, seq: int) -> int:
    import gc
    import numpy as np
    params = {k: np.zeros(s, np.float32) for k, s in param_shapes(cfg).items()}
    backend.set_state(HostState(params=params, mu=dict(params), nu=dict(params), count=1))
    del params
    gc.collect()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, micro, seq + 1)).astype(np.int32)
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    backend.train_step(tokens, 0.0)
    return _status("VmHWM") - rss


def measure(framework: str, name: str, layers: int, loss_chunk: int) -> dict:
    cfg, micro, seq, _ = models(layers)[name]
    backend = make_backend({"framework": framework}, cfg, OptimizerSpec(), loss_chunk=loss_chunk)
    backend.check_batch(micro)
    step = jax_step_bytes if framework == "jax" else torch_step_bytes
    return {"bytes": step(backend, cfg, micro, seq), "tokens": micro * seq}


def run_one(framework: str, name: str, layers: int, loss_chunk: int) -> dict:
    """measure() in a fresh process (its own peak RSS, its own JAX)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps([framework, name, layers, loss_chunk])],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loss-chunk", type=int, default=512, help="tokens per chunk of the chunked loss")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the 1B-shaped model")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    how = {"jax": "XLA temp_size_in_bytes", "torch": "peak RSS delta"}
    print(f"| model | tokens/step | framework (measure) | loss_chunk=0 MiB | loss_chunk={args.loss_chunk} MiB | saved |")
    print("|---|---|---|---|---|---|")
    for name, (_, _, _, frameworks) in models(args.layers).items():
        for framework in frameworks:
            plain, chunked = (run_one(framework, name, args.layers, c) for c in (0, args.loss_chunk))
            print(f"| {name} | {plain['tokens']} | {framework} ({how[framework]}) | {plain['bytes'] / MIB:.0f} | "
                  f"{chunked['bytes'] / MIB:.0f} | {(plain['bytes'] - chunked['bytes']) / MIB:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
