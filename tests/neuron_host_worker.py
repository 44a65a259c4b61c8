"""One of two processes of test_neuron_hooks' gloo tests: the host side of the torch-xla stack on the CPU.

`python -m tests.neuron_host_worker RANK PORT CHECKPOINT_DIR OUT_JSON`. torch's default group is made
with the backend string "cuda:gloo": like torch_xla's `xla` or TorchNeuron's `neuron` groups it has no
CPU backend, so a collective on host tensors over it raises. Everything on the host then goes through
hal.distributed's host collectives. The state is plain tensors, the same on both ranks (data parallel,
no FSDP2), written and read back through hal.fsdp_store on the mesh the torch backend picks without
FSDP2, as the torch-xla stack does.
"""
import json
import os
import sys

import numpy as np


def main(rank: int, port: str, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import torch
    import torch.distributed as dist

    from hal import distributed, layout
    from hal.fsdp_store import ShardStore
    from hal.torch_backend import _torch_mesh

    distributed.initialize_torch("cuda:gloo", distributed.launch_env())
    try:
        dist.all_gather([torch.zeros(1), torch.zeros(1)], torch.zeros(1))
        default_refuses = ""
    except RuntimeError as e:
        default_refuses = str(e)

    total = distributed.sum_over_ranks(np.array([2 ** 63 + rank, 5], np.uint64))
    shared = distributed.from_rank0({"from": rank})
    distributed.host_barrier()

    mesh, source = _torch_mesh(None, "auto", "trn1.32xlarge", 2, fsdp2=False)
    rows = ShardStore(mesh, rank, distributed.from_rank0)
    rng = np.random.default_rng(0)      # the same on both ranks: a replicated state
    tensors = {layout.param_key("model.embed_tokens.weight"): torch.from_numpy(rng.standard_normal((6, 4), np.float32)),
               layout.mu_key("model.norm.weight"): torch.from_numpy(rng.standard_normal(3, np.float32))}
    parts = rows.local_parts(tensors)
    rows.start()
    rows.write(path, {n: (shape, v.numpy()) for n, (shape, v) in parts.items()},
               {layout.COUNT: np.asarray(7, layout.COUNT_DTYPE)})
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    shapes[layout.COUNT] = ()
    local, found = rows.read(path, shapes, None, distributed.sum_over_ranks)
    with open(out, "w") as f:
        json.dump({"default_refuses": default_refuses, "sum": [int(v) for v in total], "shared": shared,
                   "mesh": mesh, "source": source,
                   "parts_whole": all(tuple(v.shape) == s for s, v in parts.values()),
                   "read_back": {n: np.asarray(local[n]).tolist() for n in tensors},
                   "written": {n: t.numpy().tolist() for n, t in tensors.items()},
                   "count": int(local[layout.COUNT]),
                   "digests": {n: str(v["digest"]) for n, v in found.items()}}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
