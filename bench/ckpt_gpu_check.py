"""One framework on one GPU: an async checkpoint save beside training steps. Prints the step before the save,
the save call, the step right after it, the commit, and whether the checkpoint holds the state of the call.

    python bench/ckpt_gpu_check.py torch llama3.2-1b
"""
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from hal import HostState, OptimizerSpec, make_backend, store  # noqa: E402
from models.spec import SIZES, reference_init  # noqa: E402
from trainer import checkpoint  # noqa: E402


def main(fw: str, size: str, seq: int = 1024, batch: int = 4, saves: int = 3) -> None:
    cfg = SIZES[size]
    b = make_backend({"framework": fw, "platform": "gpu"}, cfg, OptimizerSpec(), "bf16")
    b.set_state(HostState.fresh(reference_init(cfg, 0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, batch, seq + 1), dtype=np.int32)
    for _ in range(3):
        b.train_step(tokens, 1e-4)
    meta = {"model": cfg.to_dict(), "writer": {"framework": fw}}
    root = Path(tempfile.mkdtemp())
    rows = []
    for i in range(saves):
        t = time.perf_counter()
        b.train_step(tokens, 1e-4)
        alone = time.perf_counter() - t
        before = b.get_state().tensors() if i == saves - 1 else None
        t = time.perf_counter()
        pending = checkpoint.PendingSave(root, i + 1, b, meta, background=True)
        call = time.perf_counter() - t
        t2 = time.perf_counter()
        b.train_step(tokens, 1e-4)
        beside = time.perf_counter() - t2
        b.train_step(tokens, 1e-4)
        beside2 = time.perf_counter() - t2 - beside
        pending.finish()
        rows.append({"alone": alone, "call": call, "beside": beside, "next": beside2,
                     "commit_from_call": time.perf_counter() - t})
        if before is not None:
            read = store.read_tensors(str(root / str(i + 1) / "state"), list(before))
            bad = [k for k, v in before.items() if not np.array_equal(np.asarray(read[k]), v)]
            print(f"{fw}: the checkpoint holds the state of the call: {not bad} {bad[:3]}", flush=True)
        shutil.rmtree(root / str(i + 1), ignore_errors=True)
    pool = getattr(b, "_buffer_pool", None)
    if pool is not None:
        print(f"{fw}: host buffers allocated {pool.allocations} for {len(before) - 1} tensors over {saves} saves")
    for r in rows:
        print(fw, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama3.2-1b", saves=int(os.environ.get("SAVES", 3)))
