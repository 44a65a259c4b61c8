"""Peak host memory of a checkpoint save per process, against the state each process holds.

    python bench/save_memory.py --hal jax --model small                   # one process (all local devices)
    torchrun --nproc-per-node 2 bench/save_memory.py --hal torch --model small
    torchrun --nproc-per-node 2 bench/save_memory.py --hal jax --model small

Peak = VmHWM during the save (reset through /proc/self/clear_refs just before) minus VmRSS before it.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hal import HostState, OptimizerSpec, make_backend  # noqa: E402
from models.spec import SIZES, reference_init  # noqa: E402
from trainer import checkpoint  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hal", default="jax")
    p.add_argument("--model", default="small")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    backend = make_backend({"framework": args.hal}, SIZES[args.model], OptimizerSpec())
    state = HostState.fresh(reference_init(SIZES[args.model], 0))
    backend.set_state(state)
    total = sum(v.nbytes for v in state.tensors().values())
    del state
    gc.collect()
    # bytes this process holds: its shards of params, mu and nu
    held = 0
    if args.hal == "jax":
        held = sum(s.data.nbytes for a in backend._tensors().values() for s in a.addressable_shards)
    else:
        held = sum(backend._local(t).nbytes for t in backend._sharded_tensors().values())
    # every process must name the same directory
    out = Path(args.out or Path(tempfile.gettempdir()) / f"savemem-{os.environ.get('MASTER_PORT', os.getpid())}")
    backend.barrier("before")
    rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    checkpoint.save(out, 1, backend, {"model": {}, "writer": {}})
    peak = _status("VmHWM") - rss
    mib = 2 ** 20
    print(f"{args.hal} process {backend.process_index}/{backend.process_count}: state {total / mib:.0f} MiB in all, "
          f"{held / mib:.0f} MiB held here; save peak +{peak / mib:.0f} MiB "
          f"({peak / max(held, 1):.2f}x what it holds)", flush=True)


if __name__ == "__main__":
    main()
