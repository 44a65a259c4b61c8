"""Tensor parallelism: the mesh's tensor axis means the same on both frameworks. PyTorch shards heads, MLP and
vocabulary over it with DTensor (sequence-parallel norms and residual between the blocks) inside FSDP2 over
4 gloo processes; each mesh trains the loss curve of one process; checkpoints written by fsdp x tensor
shards restore on JAX host devices with a tensor axis and on one torch process; a tensor degree the model
cannot take is one line and exit 2."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hal import store
from hal.base import UserError
from hal.mesh import check_tensor_degree
from hal.torch_parallel import storage_spec, tensor_dims
from models.spec import SIZES, LlamaConfig, param_shapes
from tests.conftest import ROOT, cli, metrics, train
from tests.tolerances import LOSS_RTOL

STEPS = 30
COMMON = [f"trainer.steps={STEPS}", "trainer.checkpoint_every=10", "trainer.eval_every=10", "optim.lr=1e-3",
          "optim.warmup_steps=5", "trainer.global_batch=8", "trainer.seq_len=32", "trainer.log_every=10"]
PAD128 = "data.vocab=pad128"      # vocab 384: split over the tensor ranks (257 stays replicated, as on JAX)
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def launch(run_dir, *args, nproc=1, env=None):
    """python -m launch.train (torchrun with nproc processes), as a user launches it; returns its output."""
    cmd = [sys.executable, "-m", "launch.train"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launch.train"]
    r = subprocess.run(cmd + [*args, *COMMON, f"run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout + r.stderr


def losses(run_dir):
    return np.array([m["loss"] for m in metrics(run_dir)])


def rel(a, b):
    """The largest relative gap of loss curve a from b, printed beside its bound (pytest -s)."""
    assert len(a) == len(b) and len(a) > 0
    gap = float((np.abs(a - b) / np.abs(b)).max())
    print(f"max rel gap {gap:.2e} over {len(a)} steps (bound {LOSS_RTOL:.0e})")
    return gap


def writer(run_dir, step):
    return json.loads((run_dir / "checkpoints" / str(step) / "manifest.json").read_text())["writer"]


# -- the plan, without processes -------------------------------------------------------------------------

def test_tensor_axis_splits_what_the_logical_rules_say():
    dims = tensor_dims(SIZES["tiny"], 2)
    assert dims["model.layers.0.self_attn.q_proj.weight"] == 0 and dims["model.layers.0.mlp.up_proj.weight"] == 0
    assert dims["model.layers.0.self_attn.o_proj.weight"] == 1 and dims["model.layers.0.mlp.down_proj.weight"] == 1
    assert dims["model.layers.0.input_layernorm.weight"] is None
    assert dims["model.embed_tokens.weight"] is None and dims["lm_head.weight"] is None      # 257 rows
    padded = tensor_dims(LlamaConfig(**dict(SIZES["tiny"].to_dict(), vocab_size=384)), 2)
    assert padded["model.embed_tokens.weight"] == 0 and padded["lm_head.weight"] == 0


def test_a_ranks_part_is_one_block_of_the_global_array():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert storage_spec((512, 128), 0, sizes) == (("tensor", "fsdp"), None)     # column-parallel, then FSDP rows
    assert storage_spec((128, 512), 1, sizes) == ("fsdp", "tensor")             # row-parallel
    assert storage_spec((128,), None, sizes) == ("fsdp",)
    assert storage_spec((257, 128), None, sizes) is None                         # FSDP2's uneven rows: whole
    assert storage_spec((512, 128), 0, {"data": 4, "fsdp": 1, "tensor": 1}) == (None, None)


def test_a_tensor_degree_the_model_cannot_take_is_refused():
    tiny = SIZES["tiny"]          # 4 heads, 2 KV heads, intermediate 384
    with pytest.raises(UserError, match=r"hal.mesh.tensor=4 exceeds model.num_key_value_heads \(2\)"):
        check_tensor_degree(tiny, 4, "torch")
    check_tensor_degree(tiny, 4, "jax")          # JAX replicates the k/v projections instead
    with pytest.raises(UserError, match=r"does not divide model.num_attention_heads \(4\)"):
        check_tensor_degree(tiny, 8, "jax")
    odd_mlp = LlamaConfig(**dict(tiny.to_dict(), intermediate_size=385))
    with pytest.raises(UserError, match=r"does not divide model.intermediate_size \(385\)"):
        check_tensor_degree(odd_mlp, 2, "torch")
    six = LlamaConfig(**dict(tiny.to_dict(), hidden_size=192, num_attention_heads=12, num_key_value_heads=6))
    with pytest.raises(UserError, match=r"does not divide model.num_key_value_heads \(6\)"):
        check_tensor_degree(six, 4, "torch")


def _one_line_exit_2(r):
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


@pytest.mark.slow
def test_bad_meshes_are_one_line_and_exit_2(tmp_path):
    err = _one_line_exit_2(cli("launch.train", "hal=torch", "hal.mesh={fsdp:1,tensor:2}", f"run_dir={tmp_path / 'a'}"))
    assert "has 2 devices but there are 1" in err
    r = subprocess.run([sys.executable, "-m", "launch.train", "hal=jax", "hal.mesh={fsdp:1,tensor:8}",
                        f"run_dir={tmp_path / 'b'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **EIGHT_DEVICES))
    assert "does not divide model.num_attention_heads (4)" in _one_line_exit_2(r)


# -- 4 gloo processes against one ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process torch references, in this process: the byte vocabulary and the 128-padded one."""
    root = tmp_path_factory.mktemp("single")
    train(root / "bytes", "hal=torch", *COMMON)
    train(root / "pad128", "hal=torch", PAD128, *COMMON)
    return {"bytes": root / "bytes", "pad128": root / "pad128"}


@pytest.fixture(scope="module")
def fsdp2_tensor2(tmp_path_factory):
    """fsdp 2 x tensor 2 over 4 processes (the byte vocabulary: embedding and head FSDP-sharded, not split)."""
    run = tmp_path_factory.mktemp("f2t2") / "run"
    return run, launch(run, "hal=torch", "hal.mesh={fsdp:2,tensor:2}", nproc=4)


@pytest.mark.slow
def test_fsdp2_x_tensor2_equals_one_process(single, fsdp2_tensor2):
    run, out = fsdp2_tensor2
    for rank, rows in ((0, "0:4"), (1, "0:4"), (2, "4:8"), (3, "4:8")):   # a tensor group reads the same rows
        assert f"process {rank} reads rows {rows} of each micro-batch of 8" in out
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2} (hal.mesh)" in out
    assert writer(run, STEPS)["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert rel(losses(run), losses(single["bytes"])) <= LOSS_RTOL


@pytest.mark.slow
def test_hybrid_data2_x_tensor2_vocab_parallel_equals_one_process_on_half_the_memory(single, tmp_path):
    """data 2 x fsdp 1 x tensor 2 (HSDP over data) with a vocabulary the tensor ranks split: the loss on the
    sharded logits trains the same curve, and each process holds half the parameters (measured)."""
    run = tmp_path / "run"
    launch(run, "hal=torch", PAD128, "hal.mesh={data:2,fsdp:1,tensor:2}", nproc=4)
    assert rel(losses(run), losses(single["pad128"])) <= LOSS_RTOL
    alone, mine = writer(single["pad128"], STEPS)["bytes_per_device"], writer(run, STEPS)["bytes_per_device"]
    ratio = alone["params"] / mine["params"]
    print(f"parameter bytes per process: one process {alone['params']}, tensor 2 {mine['params']} ({ratio:.3f}x)")
    assert 1.99 <= ratio <= 2.0                  # the norm gains (0.1% of the parameters) stay replicated
    assert alone["optimizer"] / mine["optimizer"] == pytest.approx(ratio)


@pytest.mark.slow
def test_each_process_writes_its_block_and_digests_do_not_depend_on_the_sharding(fsdp2_tensor2):
    run, _ = fsdp2_tensor2
    ckpt = run / "checkpoints" / "10"
    tensors = json.loads((ckpt / "manifest.json").read_text())["tensors"]
    state = sum(4 * int(np.prod(t["shape"])) for t in tensors.values() if t["dtype"] == "float32")
    written = [sum(f.stat().st_size for f in (ckpt / "state" / f"ocdbt.process_{i}" / "d").iterdir())
               for i in range(4)]
    print(f"bytes written per process {written} of a {state}-byte state")
    assert all(0.15 * state <= part <= 0.35 * state for part in written) and sum(written) <= 1.05 * state
    whole = store.read_tensors(str(ckpt / "state"), list(tensors))        # one process, no sharding
    assert {n: str(d) for n, d in store.digests(whole).items()} == {n: str(t["digest"]) for n, t in tensors.items()}


def _resume_from(src, dst, step):
    """dst: a copy of run src holding only its checkpoints up to `step` (a crash after that step)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > step:
            shutil.rmtree(ckpt)


@pytest.mark.slow
def test_fsdp_x_tensor_checkpoint_goes_to_jax_tensor2_then_one_torch_process(single, fsdp2_tensor2, tmp_path):
    """torch fsdp 2 x tensor 2 (step 10) -> JAX on 8 host devices with tensor 2 (to step 20) -> torch on one
    process, and back on torch fsdp 2 x tensor 2 (to step 30): the curve continues as one uninterrupted
    process would train it."""
    run, _ = fsdp2_tensor2
    on_jax = tmp_path / "on_jax"
    _resume_from(run, on_jax, 10)
    assert "start at step 10" in launch(on_jax, "hal=jax", "hal.mesh={data:1,fsdp:4,tensor:2}", env=EIGHT_DEVICES)
    assert writer(on_jax, 20)["framework"] == "jax" and writer(on_jax, 20)["mesh"]["tensor"] == 2
    assert rel(losses(on_jax)[10:], losses(single["bytes"])[10:]) <= LOSS_RTOL
    back = tmp_path / "back_on_torch"
    _resume_from(on_jax, back, 20)
    assert train(back, "hal=torch", *COMMON)["start_step"] == 20
    assert writer(back, STEPS)["framework"] == "torch" and writer(back, STEPS)["process_count"] == 1
    assert rel(losses(back)[20:], losses(single["bytes"])[20:]) <= LOSS_RTOL
    # and JAX's step-20 checkpoint read back onto fsdp 2 x tensor 2: each process reads only its blocks
    again = tmp_path / "again_on_torch_f2t2"
    _resume_from(on_jax, again, 20)
    assert "start at step 20" in launch(again, "hal=torch", "hal.mesh={fsdp:2,tensor:2}", nproc=4)
    assert writer(again, STEPS)["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert rel(losses(again)[20:], losses(single["bytes"])[20:]) <= LOSS_RTOL


@pytest.mark.slow
def test_a_rules_tensor_axis_with_activation_checkpointing_on_2_processes(single, tmp_path):
    """trn1.32xlarge's rule (tensor 2 inside a chip) on 2 torch processes is tensor parallelism as written;
    recomputing the blocks in the backward pass gives the same curve."""
    run = tmp_path / "run"
    out = launch(run, "hal=torch", "trainer.remat=true", nproc=2, env={"TRICHIP_INSTANCE_TYPE": "trn1.32xlarge"})
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 2} (mesh rule for trn1.32xlarge)" in out
    assert rel(losses(run), losses(single["bytes"])) <= LOSS_RTOL


@pytest.mark.slow
def test_torch_compile_per_block_with_tensor_parallelism(single, tmp_path):
    """Each block compiled (inductor) with its DTensor layers and sequence-parallel collectives inside."""
    run = tmp_path / "run"
    out = launch(run, "hal=torch", "hal.compile=true", "hal.mesh={tensor:2}", nproc=2)
    assert "process 1 holds params" in out       # the per-device bytes, measured at the first step
    assert rel(losses(run), losses(single["bytes"])) <= LOSS_RTOL


@pytest.mark.slow
def test_bf16_fsdp2_x_tensor2_trains(tmp_path):
    run = tmp_path / "run"
    launch(run, "hal=torch", PAD128, "trainer.precision=bf16", "hal.mesh={fsdp:2,tensor:2}", nproc=4)
    ls = losses(run)
    assert np.isfinite(ls).all() and ls[-1] < ls[0] - 1.0
    assert writer(run, STEPS)["precision"] == "bf16"


# -- JAX: the same mesh, the same layout of activations ------------------------------------------------------

RESIDUAL_PROBE = """
import json, re, sys
import numpy as np
from hal.base import HostState, OptimizerSpec
from hal.jax_backend import JaxBackend
from models.spec import SIZES, reference_init
b = JaxBackend(SIZES["tiny"], OptimizerSpec(), platform="cpu", mesh={"data": 1, "fsdp": 2, "tensor": 2})
b.check_batch(8)
b.set_state(HostState.fresh(reference_init(SIZES["tiny"], 0)))
tokens = b._put_batch(np.zeros((1, 8, 65), np.int32))
hlo = b._train_step.lower(b.params, b.opt_state, tokens, np.float32(1e-3)).compile().as_text()
adds = sorted({"x".join(m) for m in re.findall(r"= f32\\[(\\d+),(\\d+),128\\]\\{[^}]*\\} add\\(", hlo)})
print(json.dumps({"adds": adds, "bytes": b.describe()["bytes_per_device"]}))
"""


@pytest.mark.slow
def test_jax_tensor_axis_splits_the_residual_stream_over_the_sequence():
    """On 4 host devices as fsdp 2 x tensor 2, every residual add of the compiled step runs on this device's
    4 rows (fsdp) x 32 of the 64 positions (tensor): sequence parallelism, as torch lays it out; the
    parameters a device holds are a quarter of them (the norm gains and the 257-row vocabulary: fsdp only)."""
    r = subprocess.run([sys.executable, "-c", RESIDUAL_PROBE], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    probe = json.loads(r.stdout.strip().splitlines()[-1])
    assert probe["adds"] == ["4x32"], probe
    params = sum(4 * int(np.prod(s)) for s in param_shapes(SIZES["tiny"]).values())
    assert params / 4 <= probe["bytes"]["params"] <= params / 4 * 1.3


@pytest.mark.slow
def test_jax_fsdp2_x_tensor2_equals_one_torch_process(single, tmp_path):
    run = tmp_path / "run"
    out = launch(run, "hal=jax", "hal.mesh={fsdp:2,tensor:2}",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert "each device holds params" in out
    assert rel(losses(run), losses(single["bytes"])) <= LOSS_RTOL


def test_launch_info_sizes_a_layout_per_device():
    from launch.info import layout
    run = ["hal=torch", "model.vocab_size=384", "trainer.seq_len=64"]
    data2 = layout([*run, "hal.mesh={data:2}"], None)            # the same rows per device, without tensor 2
    tensor2 = layout([*run, "hal.mesh={data:2,fsdp:1,tensor:2}"], None)
    assert tensor2["devices"] == 4 and tensor2["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    for part in ("params", "optimizer"):
        assert 1.99 <= data2["bytes_per_device"][part] / tensor2["bytes_per_device"][part] <= 2.0
    assert tensor2["bytes_per_device"]["activations"] < data2["bytes_per_device"]["activations"]
    with pytest.raises(UserError, match="exceeds model.num_key_value_heads"):
        layout(["hal=torch", "hal.mesh={tensor:4}"], None)


# -- tied embeddings and document masks: 4 steps of the backend on 2 tensor ranks against one process ----------

STEPS_PROBE = """
import json, sys
import numpy as np
from hal.base import HostState, OptimizerSpec
from hal.torch_backend import TorchBackend
from models.spec import SIZES, LlamaConfig, reference_init

def losses(mesh, vocab, tied, eos):
    cfg = LlamaConfig(**dict(SIZES["tiny"].to_dict(), vocab_size=vocab, tie_word_embeddings=tied))
    b = TorchBackend(cfg, OptimizerSpec(), platform="cpu", mesh=mesh, document_eos=eos)
    b.set_state(HostState.fresh(reference_init(cfg, 0)))
    b.check_batch(8)
    tokens = np.random.default_rng(0).integers(0, 20, (1, 8, 33)).astype(np.int32)   # token 10 ends documents
    return b.process_index, [b.train_step(tokens, 1e-3).loss for _ in range(4)], b.logits(tokens[0, :2, :-1])

rank, ls, logits = losses(json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "tied",
                          None if sys.argv[4] == "none" else int(sys.argv[4]))
if rank == 0:
    np.save(sys.argv[5], logits)
    print(json.dumps(ls))
"""


@pytest.mark.slow
@pytest.mark.parametrize("vocab,tied,eos", [(384, "tied", "none"), (257, "tied", "none"), (384, "untied", "10")])
def test_tied_embeddings_and_document_masks_under_tensor_parallelism(tmp_path, vocab, tied, eos):
    """A tied head reads the embedding's weight (split over the vocabulary, or whole where 257 rows are not
    split); document masks are per sequence, untouched by the sequence split between the blocks."""
    script = tmp_path / "probe.py"
    script.write_text(STEPS_PROBE)
    outs = {}
    for nproc, mesh in ((1, "null"), (2, '{"tensor": 2}')):
        cmd = [sys.executable, str(script)] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
        r = subprocess.run(cmd + [mesh, str(vocab), tied, eos, str(tmp_path / f"logits{nproc}.npy")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stderr[-3000:]
        outs[nproc] = np.array(json.loads(r.stdout.strip().splitlines()[-1]))
    assert rel(outs[2], outs[1]) <= LOSS_RTOL
    whole, split = np.load(tmp_path / "logits1.npy"), np.load(tmp_path / "logits2.npy")
    assert whole.shape == split.shape == (2, 32, vocab) and np.abs(whole - split).max() <= 1e-5 * np.abs(whole).max()
