"""README claims that take several processes (torchrun, gloo on the CPU), proved by running them; each
test's docstring quotes the sentence it proves. Two launches: FSDP2 in bf16 over 2 processes (its precision
policy and what each process wrote of its checkpoint) and hybrid sharding over 4. A platform rule's tensor
axis on torch: tests/test_tensor_parallel.py."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT, metrics, train
from tests.tolerances import LOSS_RTOL

pytestmark = pytest.mark.slow

FAST = ["trainer.global_batch=4", "trainer.seq_len=32", "trainer.eval_every=0", "trainer.log_every=1",
        "optim.lr=3e-3", "optim.warmup_steps=2"]


def torchrun(nproc: int, *args, env=None):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert r.returncode == 0, r.stderr[-5000:]
    return r


# Runs trainer.loop.train under torchrun exactly as launch.train does, and records the backend it builds (the
# recording wrapper returns that backend unchanged), then reads its FSDP2 modules and one more forward pass.
PROBE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    from torch.distributed.fsdp import FSDPModule
    import trainer.loop as loop
    from tests.conftest import compose

    built, make_backend = [], loop.make_backend
    loop.make_backend = lambda *a, **k: built.append(make_backend(*a, **k)) or built[-1]
    loop.train(compose(sys.argv[3:]), sys.argv[2])
    b = built[0]
    units = [m for m in b.net.modules() if isinstance(m, FSDPModule)]
    mp = [u._get_fsdp_state()._mp_policy for u in units]
    policies = sorted({(str(m.param_dtype), str(m.reduce_dtype)) for m in mp})
    fsdp_params = [p for u in units for p in u._get_fsdp_state()._fsdp_param_group.fsdp_params]
    sharded = sorted({str(p.sharded_param.dtype) for p in fsdp_params})
    seen = []
    b.net.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.append(str(m.weight.dtype)))
    b.eval_loss(np.random.default_rng(0).integers(0, 257, (1, 4, 33)))
    if b.process_index == 0:
        json.dump({"units": len(units), "policies": policies, "mesh_source": b.mesh_source,
                   "sharded": sharded,
                   "gathered": sorted({str(p.param_dtype) for p in fsdp_params}),
                   "reduced": sorted({str(p.reduce_dtype) for p in fsdp_params}),
                   "forward": sorted(set(seen))}, open(sys.argv[1], "w"))
''')


@pytest.fixture(scope="module")
def bf16_two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    (root / "probe.py").write_text(PROBE)
    torchrun(2, str(root / "probe.py"), str(root / "probe.json"), str(root / "run"), "hal=torch",
             "trainer.precision=bf16", "trainer.steps=8", *FAST, env={"PYTHONPATH": str(ROOT)})
    return {"run": root / "run", "probe": json.loads((root / "probe.json").read_text())}


def test_bf16_fsdp2_is_bf16_params_fp32_reduce(bf16_two_processes):
    """"`trainer.precision=bf16` is a `MixedPrecisionPolicy` (bf16 params, fp32 reduce)" — every FSDP2 unit
    (4 blocks and the root) gathers bf16 parameters, reduce-scatters gradients in fp32 and keeps its shards
    (and so the optimizer's parameters) in fp32; a forward pass computes with bf16 weights; training in it
    lowers the loss."""
    p = bf16_two_processes["probe"]
    assert p["units"] == 5 and p["policies"] == [["torch.bfloat16", "torch.float32"]]
    assert p["gathered"] == ["torch.bfloat16"] and p["reduced"] == ["torch.float32"]
    assert p["sharded"] == ["torch.float32"] and p["forward"] == ["torch.bfloat16"]
    losses = np.array([m["loss"] for m in metrics(bf16_two_processes["run"])])
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5


def test_each_process_writes_only_its_own_shards(bf16_two_processes):
    """"Checkpoints are written by every process for the shards it holds — nothing is gathered" — with two
    writers the checkpoint is OCDBT with one data directory per process (ocdbt.process_<i>/d); each holds
    half the state's bytes (params and moments are sharded in two by rows), not the whole of it."""
    ckpt = bf16_two_processes["run"] / "checkpoints" / "8"
    tensors = json.loads((ckpt / "manifest.json").read_text())["tensors"]
    state = sum(4 * int(np.prod(t["shape"])) for t in tensors.values() if t["dtype"] == "float32")
    written = [sum(f.stat().st_size for f in (ckpt / "state" / f"ocdbt.process_{i}" / "d").iterdir())
               for i in range(2)]
    assert sorted(p.name for p in (ckpt / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    for part in written:
        assert 0.45 * state <= part <= 0.55 * state, (written, state)
    assert 0.95 * state <= sum(written) <= 1.05 * state


def test_hybrid_sharding_with_fsdp_2_over_4_processes_equals_one_process(tmp_path):
    """"`hal.mesh={data:2,fsdp:4}` is hybrid sharding" — data 2 x FSDP 2 over 4 gloo processes trains the loss
    curve of one process within LOSS_RTOL (tests/tolerances.py), and its checkpoint says which mesh wrote it."""
    steps = [*FAST, "trainer.steps=6", "hal=torch"]
    torchrun(4, "-m", "launch.train", *steps, "hal.mesh={data:2,fsdp:2}", f"run_dir={tmp_path / 'hybrid'}")
    train(tmp_path / "single", *steps)
    hybrid = np.array([m["loss"] for m in metrics(tmp_path / "hybrid")])
    single = np.array([m["loss"] for m in metrics(tmp_path / "single")])
    assert len(hybrid) == 6 and (np.abs(hybrid - single) / single).max() <= LOSS_RTOL, (hybrid, single)
    writer = json.loads((tmp_path / "hybrid" / "checkpoints" / "6" / "manifest.json").read_text())["writer"]
    assert writer["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and writer["process_count"] == 4
