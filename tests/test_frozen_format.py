"""Checkpoint format version 1, frozen: a checkpoint written by `python -m launch.train` is committed under
tests/fixtures/checkpoint-format1/ (tests/fixtures/README.md has the command and the commit), and every
release verifies it, resumes from it on both frameworks, and computes the digests pinned here.

A change to the format or to the digest's definition (hal.store.digest_reference) must come with a
migration that still reads this fixture and a new fixture beside it — never a silent edit of this
fixture or of the numbers and names pinned in this file: they are what users' checkpoints on disk hold.

Only the command line and hal.store are used to read it, so optional manifest fields added later do
not matter here; what format 1 holds does.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ml_dtypes import bfloat16

from hal import store
from tests.conftest import ROOT, cli, metrics
from trainer.schedule import learning_rate

FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint-format1"
STEP = 4
MODEL = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_hidden_layers=2",
         "model.num_attention_heads=2", "model.num_key_value_heads=1"]
RUN = ["trainer.global_batch=2", "trainer.seq_len=16", "trainer.eval_every=0", "trainer.tensorboard=false"]

LAYER = {"input_layernorm.weight": [16], "post_attention_layernorm.weight": [16],
         "self_attn.q_proj.weight": [16, 16], "self_attn.k_proj.weight": [8, 16],
         "self_attn.v_proj.weight": [8, 16], "self_attn.o_proj.weight": [16, 16],
         "mlp.gate_proj.weight": [32, 16], "mlp.up_proj.weight": [32, 16], "mlp.down_proj.weight": [16, 32]}
PARAMS = {"model.embed_tokens.weight": [257, 16], "model.norm.weight": [16], "lm_head.weight": [257, 16],
          **{f"model.layers.{i}.{k}": shape for i in (0, 1) for k, shape in LAYER.items()}}
# storage name -> (shape, dtype): params, both AdamW moments under opt/mu/ and opt/nu/, and the update count
TENSORS = {**{f"{group}{name}": (shape, "float32") for group in ("params/", "opt/mu/", "opt/nu/")
              for name, shape in PARAMS.items()},
           "opt/count": ([], "int32")}

# digest_reference(np.arange(rows * cols).astype(dtype).reshape(rows, cols)): last axes that pack 2 or 4
# elements into a 64-bit word (8 columns) and one that packs none (7 columns)
PINNED_DIGESTS = [
    (np.float32, (6, 8), 2504206751462933973),
    (np.float32, (5, 7), 5382107694338239094),
    (bfloat16, (6, 8), 13822471488483034752),
    (bfloat16, (5, 7), 10552935254059335920),
    (np.int32, (6, 8), 822147319602318184),
    (np.int32, (5, 7), 10987654368497070243),
]


def _manifest(ckpt=FIXTURE) -> dict:
    return json.loads((Path(ckpt) / "manifest.json").read_text())


@pytest.mark.slow
def test_the_fixture_verifies_with_the_cli_and_a_damaged_copy_does_not(tmp_path):
    r = cli("launch.convert", "verify", str(FIXTURE))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.startswith("OK:"), r.stdout
    damaged = shutil.copytree(FIXTURE, tmp_path / "damaged")
    chunk = damaged / "state" / "opt.nu.lm_head.weight" / "0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    r = cli("launch.convert", "verify", str(damaged))
    assert r.returncode == 1 and "opt/nu/lm_head.weight" in r.stdout, r.stdout + r.stderr[-3000:]


def test_the_manifest_holds_the_pinned_format_and_tensors():
    manifest = _manifest()
    assert manifest["format_version"] == 1 and manifest["step"] == STEP
    assert manifest["data"] == {"path": "builtin:python_docs", "seed": 0, "next_step": STEP}
    model = manifest["model"]
    assert (model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"],
            model["num_attention_heads"], model["num_key_value_heads"], model["vocab_size"]) == (16, 32, 2, 2, 1, 257)
    described = {name: (info["shape"], info["dtype"]) for name, info in manifest["tensors"].items()}
    assert described == TENSORS
    assert all(isinstance(info["digest"], int) and 0 <= info["digest"] < 2**64
               for info in manifest["tensors"].values())


def test_the_fixture_tensors_have_the_digests_its_manifest_records():
    """Read through hal.store, each tensor's digest by the definition and by the fast path is the number
    written into the manifest when the fixture was made; the training state is not trivial."""
    manifest = _manifest()
    tensors = store.read_tensors(str(FIXTURE / "state"), list(TENSORS))
    for name, (shape, dtype) in TENSORS.items():
        array = np.asarray(tensors[name])
        assert list(array.shape) == shape and array.dtype == np.dtype(dtype), name
        recorded = manifest["tensors"][name]["digest"]
        assert store.digest_reference(array) == recorded and store.digest(array) == recorded, name
    assert int(tensors["opt/count"]) == STEP
    for name in PARAMS:
        assert np.abs(tensors[f"opt/mu/{name}"]).max() > 0 and tensors[f"opt/nu/{name}"].min() >= 0, name
        assert tensors[f"opt/nu/{name}"].max() > 0, name


@pytest.mark.parametrize("dtype,shape,expected", PINNED_DIGESTS,
                         ids=[f"{np.dtype(d).name}-{r}x{c}" for d, (r, c), _ in PINNED_DIGESTS])
def test_the_digest_of_a_known_array_is_pinned(dtype, shape, expected):
    """The same number from the definition and the fast path, for the whole array and summed over two row
    shards and over two column shards (mod 2**64)."""
    a = np.arange(shape[0] * shape[1]).astype(dtype).reshape(shape)
    rows = [(slice(0, 2),), (slice(2, shape[0]),)]
    cols = [(slice(None), slice(0, 3)), (slice(None), slice(3, shape[1]))]
    for digest in (store.digest_reference, store.digest):
        assert digest(a) == expected, digest.__name__
        for cut in (rows, cols):
            assert sum(digest(a[index], index, shape) for index in cut) % 2**64 == expected, (digest.__name__, cut)


@pytest.mark.slow
def test_training_resumes_from_the_fixture_on_both_frameworks(tmp_path):
    """trainer.init_from=the fixture, two more steps on JAX and on PyTorch: the step count, the schedule
    and the optimizer's update count go on from step 4, and both frameworks compute the same losses."""
    source = shutil.copytree(FIXTURE, tmp_path / "fixture")        # the committed files are never written
    losses = {}
    for fw in ("jax", "torch"):
        run = tmp_path / fw
        r = cli("launch.train", f"hal={fw}", f"trainer.init_from={source}", f"trainer.steps={STEP + 2}", *MODEL,
                *RUN, f"run_dir={run}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"start at step {STEP} from" in (run / "train.log").read_text()
        rows = metrics(run)
        assert [m["step"] for m in rows] == [STEP + 1, STEP + 2]
        for m in rows:
            assert m["lr"] == pytest.approx(learning_rate(m["step"] - 1, peak_lr=3e-3, warmup_steps=30,
                                                          total_steps=STEP + 2, min_lr_ratio=0.1), rel=1e-12)
        newest = run / "checkpoints" / str(STEP + 2)
        count = store.read_tensors(str(newest / "state"), ["opt/count"])["opt/count"]
        assert int(count) == STEP + 2
        losses[fw] = [m["loss"] for m in rows]
    assert losses["torch"] == pytest.approx(losses["jax"], rel=1e-4)
    assert _files(source) == _files(FIXTURE)                       # reading a checkpoint leaves it as it was


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
