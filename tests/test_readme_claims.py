"""README claims, each proved by doing what the sentence says (one process per run; the multi-process claims
are in test_readme_claims_multiprocess.py). Every test's docstring quotes the sentence it proves."""
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import faultlib
from tests.conftest import ROOT, cli, metrics, train
from tests.tolerances import LOSS_RTOL

try:
    from tests.test_object_store import BUCKET, s3  # noqa: F401  (s3: the moto server fixture)
except pytest.skip.Exception:       # boto3 / moto[server] not installed: only the object-store test skips
    BUCKET = "trichip-test"

    @pytest.fixture(scope="module")
    def s3():
        pytest.skip("pip install boto3 'moto[server]'")

FAST = ["trainer.global_batch=4", "trainer.seq_len=32", "trainer.eval_every=0", "trainer.log_every=1"]
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


def launch(*args, env=None, timeout=600):
    """python -m launch.train ARGS as a user runs it, with `env` (default: this process's)."""
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=timeout)


def ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def tensors(ckpt: Path) -> dict:
    """Every tensor of a checkpoint, as NumPy arrays."""
    from hal import store
    names = list(manifest(ckpt)["tensors"])
    return {k: np.asarray(v) for k, v in store.read_tensors(str(ckpt / "state"), names).items()}


def column(run_dir, key):
    return np.array([m[key] for m in metrics(run_dir)])


def documented_lr(count, *, peak, warmup, total, ratio, schedule):
    """The README's schedule, written out: linear warmup in which the first update already gets
    peak / warmup, then constant, or cosine / linear decay from peak to ratio * peak at `total`."""
    if count < warmup:
        return peak * (count + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (count - warmup) / (total - warmup)
    low = ratio * peak
    if schedule == "linear":
        return peak + (low - peak) * progress
    return low + (peak - low) * (1 + math.cos(math.pi * progress)) / 2


# -- Configuration ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    """"`python -m launch.train [group=option ...] [key=value ...]`; `--multirun` sweeps work as usual."

    One run directory per swept value, each trained with the value it was given."""
    ok(launch("-m", "hal=torch", "trainer.steps=2", "optim.lr=1e-3,2e-3", "optim.warmup_steps=0",
              "optim.schedule=constant", *FAST, f"hydra.sweep.dir={tmp_path}"))
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    given = []
    for run in runs:
        lr = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["optim"]["lr"]
        given.append(lr)
        assert list(column(run, "step")) == [1, 2] and list(column(run, "lr")) == [lr, lr]
        assert manifest(run / "checkpoints" / "2")["step"] == 2
    assert sorted(given) == [1e-3, 2e-3]


@pytest.mark.slow
def test_init_weights_only_takes_params_with_a_fresh_optimizer_at_step_0(tmp_path):
    """"`trainer.*`: ... `init_from`, `init_weights_only`" (configs/train.yaml: "with init_from: take params
    only (fresh optimizer, step 0)").

    With lr 0 the one step leaves the loaded params as they are; the optimizer state after it is what one
    AdamW update from zero moments gives: count 1, mu = (1 - b1) g, nu = (1 - b2) g^2, so mu^2 / nu is the
    same constant everywhere (moments carried over from the source would break that)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    train(src, "hal=torch", "trainer.steps=3", *FAST)
    summary = train(dst, "hal=torch", f"trainer.init_from={src}", "trainer.init_weights_only=true",
                    "trainer.steps=1", "optim.lr=0.0", *FAST)
    assert summary["start_step"] == 0 and list(column(dst, "step")) == [1]
    a, b = tensors(src / "checkpoints" / "3"), tensors(dst / "checkpoints" / "1")
    params = [k for k in a if k.startswith("params/")]
    assert len(params) == 4 * 9 + 3
    for k in params:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert int(a["opt/count"]) == 3 and int(b["opt/count"]) == 1

    def moment_ratio(t):
        mu = np.concatenate([t[k.replace("params/", "opt/mu/")].ravel() for k in params]).astype(np.float64)
        nu = np.concatenate([t[k.replace("params/", "opt/nu/")].ravel() for k in params]).astype(np.float64)
        seen = nu > 1e-30
        return mu[seen] ** 2 / nu[seen]
    fresh = (1 - 0.9) ** 2 / (1 - 0.95)
    np.testing.assert_allclose(moment_ratio(b), fresh, rtol=1e-5)
    assert np.abs(moment_ratio(a) - fresh).max() > 0.01       # three updates in: not one constant


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_column_is_the_documented_schedule(tmp_path, schedule):
    """"The learning rate is `trainer.schedule.learning_rate(step)`: linear warmup (the first step already
    gets `lr / warmup_steps`), then cosine to `min_lr_ratio * lr`." and "`adamw` (`lr`, `warmup_steps`,
    `schedule=cosine|linear|constant`, ...)"."""
    steps, warmup, peak, ratio = 9, 3, 2e-3, 0.25
    train(tmp_path, "hal=torch", f"trainer.steps={steps}", f"optim.lr={peak}", f"optim.warmup_steps={warmup}",
          f"optim.min_lr_ratio={ratio}", f"optim.schedule={schedule}", *FAST)
    want = [documented_lr(c, peak=peak, warmup=warmup, total=steps, ratio=ratio, schedule=schedule)
            for c in range(steps)]
    got = column(tmp_path, "lr")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert got[0] == peak / warmup and got[warmup] == peak
    if schedule == "constant":
        assert (got[warmup:] == peak).all()
    else:
        assert (np.diff(got[warmup:]) < 0).all() and got[-1] > ratio * peak


@pytest.mark.slow
def test_jax_bf16_trains_and_keeps_float32_params(tmp_path):
    """"`precision=fp32|bf16`" (configs/train.yaml: "bf16 compute, fp32 params and optimizer state") on
    `hal=jax`: the loss falls and stays finite, the compute differs from fp32 (bf16 is in effect), and the
    checkpoint holds float32 params and moments."""
    common = ["hal=jax", "trainer.steps=12", "optim.lr=3e-3", "optim.warmup_steps=2", *FAST]
    train(tmp_path / "bf16", *common, "trainer.precision=bf16")
    train(tmp_path / "fp32", *common)
    bf16, fp32 = column(tmp_path / "bf16", "loss"), column(tmp_path / "fp32", "loss")
    assert np.isfinite(bf16).all() and bf16[-1] < bf16[0] - 0.5
    gap = np.abs(bf16 - fp32) / fp32
    assert gap.max() > 1e-4 and gap.max() < 0.05                # rounded differently, the same training
    ckpt = tmp_path / "bf16" / "checkpoints" / "12"
    m = manifest(ckpt)
    assert m["writer"]["precision"] == "bf16"
    floats = {k: v for k, v in tensors(ckpt).items() if k != "opt/count"}
    assert len(floats) == 3 * (4 * 9 + 3)
    assert {str(v.dtype) for v in floats.values()} == {"float32"}
    assert {m["tensors"][k]["dtype"] for k in floats} == {"float32"}


@pytest.mark.slow
@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_gradient_accumulation_equals_one_full_batch(tmp_path, fw):
    """"`micro_batch` (gradient accumulation)": a global batch of 4 as 2 micro-batches of 2 gives the loss
    curve of one batch of 4, within LOSS_RTOL (two computations of one run). Measured on the CPU over these 8
    steps: loss gaps up to 1.0e-7 (torch) and 1.8e-7 (JAX) relative; gradient norms up to 2.6e-6 and 4.9e-6
    (a norm over every element sums the rounding differences of the two ways), bound 2e-5."""
    common = [f"hal={fw}", "trainer.steps=8", "optim.lr=3e-3", "optim.warmup_steps=2", *FAST]
    train(tmp_path / "full", *common)
    train(tmp_path / "micro", *common, "trainer.micro_batch=2")
    for key, bound in (("loss", LOSS_RTOL), ("grad_norm", 2e-5)):
        full, micro = column(tmp_path / "full", key), column(tmp_path / "micro", key)
        assert len(full) == 8 and (np.abs(micro - full) / np.abs(full)).max() <= bound, (key, micro, full)
    assert column(tmp_path / "full", "loss")[-1] < column(tmp_path / "full", "loss")[0] - 0.5


# -- Resume and hand over --------------------------------------------------------------------------------

def readme_block(heading_line: str) -> list[str]:
    """The commands of the first ```bash block after the README line that starts with heading_line."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("\n" + heading_line):]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_resume_commands_resume_what_they_say(tmp_path):
    """"Resume and hand over: an existing run directory resumes from its latest checkpoint, on either
    framework." — the README's commands (after its quick-start runs), at a small batch shape
    (trainer.global_batch=4 trainer.seq_len=32 appended to each): what each resumed from, at which step,
    and that the curve and the schedule go on from there."""
    quick = [c for c in readme_block("## Quick start") if c.startswith("python -m launch.train")]
    resume = readme_block("Resume and hand over")
    assert len(quick) == 2 and len(resume) == 2
    env = dict(os.environ, RUN=str(tmp_path))
    for cmd in quick + resume:
        r = subprocess.run(["bash", "-c", f"{cmd} trainer.global_batch=4 trainer.seq_len=32"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-3000:]}"
    jax, torch, handed = tmp_path / "jax", tmp_path / "torch", tmp_path / "from-torch"
    # `hal=torch trainer.steps=60 run_dir=$RUN/jax`: the JAX run's step-40 checkpoint, continued on torch
    assert f"start at step 40 from {jax}/checkpoints/40 (step 40, written by jax" in (jax / "train.log").read_text()
    assert list(column(jax, "step")) == list(range(1, 61))
    assert manifest(jax / "checkpoints" / "60")["writer"]["framework"] == "torch"
    # `hal=jax trainer.init_from=$RUN/torch ...`: a new run dir starting at torch's step 40
    handed_log = (handed / "train.log").read_text()
    assert f"start at step 40 from {torch}/checkpoints/40 (step 40, written by torch" in handed_log
    assert list(column(handed, "step")) == list(range(41, 61))
    assert manifest(handed / "checkpoints" / "60")["writer"]["framework"] == "jax"
    for resumed, source in ((column(jax, "loss")[40:], column(jax, "loss")[:40]),
                            (column(handed, "loss"), column(torch, "loss"))):
        assert abs(resumed[0] - source[-1]) < 0.1 * source[-1] and resumed[0] < source[0] - 1.0   # not from scratch
    schedule = dict(peak=3e-3, warmup=30, total=60, ratio=0.1, schedule="cosine")     # configs/optim/adamw.yaml
    np.testing.assert_allclose(column(handed, "lr"), [documented_lr(c, **schedule) for c in range(40, 60)],
                               rtol=1e-12)


# -- Sharded runs: mesh rules -------------------------------------------------------------------------

@pytest.mark.slow
def test_log_names_the_mesh_chosen_for_the_instance_type(tmp_path):
    """"Platform rules pick a mesh per instance type (`hal.instance_type=` or `$TRICHIP_INSTANCE_TYPE`): ...
    trn1.32xlarge / trn2.48xlarge tensor parallel inside a chip, FSDP across chips ... The log says which mesh
    was chosen and why." — TRICHIP_INSTANCE_TYPE=trn2.48xlarge on 8 JAX host devices: tensor 4, FSDP over
    the remaining 2."""
    env = dict(os.environ, TRICHIP_INSTANCE_TYPE="trn2.48xlarge", XLA_FLAGS=EIGHT_DEVICES)
    run = tmp_path / "run"
    ok(launch("hal=jax", "trainer.steps=1", *FAST, f"run_dir={run}", env=env))
    mesh = {"data": 1, "fsdp": 2, "tensor": 4}
    assert f"8 device(s) in 1 process(es), mesh {mesh} (mesh rule for trn2.48xlarge)" in (run / "train.log").read_text()
    assert manifest(run / "checkpoints" / "1")["writer"]["mesh"] == mesh


# -- MFU: the known chips' peaks ----------------------------------------------------------------------

# Dense (no 2:4 sparsity) bf16 TFLOP/s per chip from the vendors' pages, as collected in the project's
# chip reference (shared/reference/chips-and-prices.md, section 1), and the device kinds each runtime reports
# for that chip: torch.cuda.get_device_name, and JAX's device_kind (both spellings JAX itself accepts,
# jax/_src/pallas/mosaic/tpu_info.py chip_version_from_device_kind).
VENDOR_DENSE_BF16 = {
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100"): 989.0,          # H100 SXM; 1,979 is the sparse figure
    ("NVIDIA H200",): 989.0,
    ("TPU v5 lite", "TPU v5e"): 197.0,
    ("TPU v5p",): 459.0,
    ("TPU v6 lite", "TPU v6e"): 918.0,
}


@pytest.mark.parametrize("kinds,tflops", list(VENDOR_DENSE_BF16.items()), ids=lambda v: str(v))
def test_known_chip_peaks_are_the_dense_vendor_figures(kinds, tflops):
    """"`metrics.jsonl` (one JSON object a step: ... `mfu` when the chip's peak is known ...)" — the peak
    behind MFU is the chip's dense bf16 figure, for every device kind the frameworks report for it."""
    from trainer.observe import peak_flops
    for kind in kinds:
        assert peak_flops(kind, "bf16") == tflops * 1e12, kind


def test_tpu_v5p_is_known_under_the_kind_jax_reports():
    """"`mfu` when the chip's peak is known" — TPU v5p under its other device-kind spelling."""
    from trainer.observe import peak_flops
    assert peak_flops("TPU v5", "bf16") == 459.0e12


# -- Checkpoints: saves in the background, and when they block --------------------------------------------

SMALL = ["hal=torch", "model=small", "trainer.global_batch=1", "trainer.seq_len=8", "trainer.eval_every=0",
         "trainer.log_every=1"]


def _vm_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmSize:\s+(\d+) kB", status, re.M).group(1)) * 1024


@pytest.mark.slow
def test_a_save_blocks_where_a_background_copy_does_not_fit(tmp_path):
    """"where a second copy of the state does not fit in memory, that save blocks instead"

    The resumed torch run (its restore has loaded the checkpoint libraries) gets an address-space limit,
    set from outside as a container's would be, of what it uses after a step plus half its state (model
    `small`: 300 MB of params and moments): the copy for the step-4 save cannot be made, the save blocks,
    and training goes on; the limit is lifted once that checkpoint is in place. MALLOC_MMAP_THRESHOLD_ makes
    each tensor its own mapping, so freed memory is returned and a copy cannot hide in it."""
    run = tmp_path / "run"
    train(run, *SMALL, "trainer.steps=1")
    m = manifest(run / "checkpoints" / "1")
    state = sum(4 * math.prod(t["shape"]) for k, t in m["tensors"].items() if t["dtype"] == "float32")
    assert state > 250e6
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    cmd = [sys.executable, "-m", "launch.train", *SMALL, "trainer.steps=8", "trainer.checkpoint_every=4",
           "trainer.async_save=true", f"run_dir={run}"]
    # 1 MiB thread stacks (glibc takes the default from RLIMIT_STACK): the writer threads then hold dozens
    # of MiB of address space, not hundreds, beside the state
    p = subprocess.Popen(["bash", "-c", 'ulimit -S -s 1024 && exec "$@"', "-", *cmd], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    limited_after, lifted = None, False
    try:
        while p.poll() is None and not lifted:
            done = (run / "metrics.jsonl").read_text().count("\n") if (run / "metrics.jsonl").exists() else 0
            if limited_after is None and done >= 2:           # one step after the resume from step 1
                limit = _vm_bytes(p.pid) + state // 2
                resource.prlimit(p.pid, resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
                limited_after = (run / "metrics.jsonl").read_text().count("\n")
            elif limited_after is not None and (run / "checkpoints" / "4").is_dir():
                resource.prlimit(p.pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                lifted = True                                 # the pressure is over: the last save as usual
            time.sleep(0.005)
        err = p.communicate(timeout=600)[1]
    finally:
        p.kill()
    assert p.returncode == 0, err[-4000:]
    assert limited_after is not None and limited_after < 4, limited_after      # in place before the save
    log = (run / "train.log").read_text()
    assert "checkpoint 4: no room for a background copy of the state (" in log
    resumed = log[log.index("start at step 1 from"):]
    assert resumed.index(f"checkpoint {run}/checkpoints/4") < resumed.index("step 5/8")   # blocked: before step 5
    assert [manifest(run / "checkpoints" / str(s))["step"] for s in (4, 8)] == [4, 8]
    assert list(column(run, "step")) == list(range(1, 9))
    r = cli("launch.convert", "verify", str(run / "checkpoints" / "4"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _complete_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]    # not a line cut short


@pytest.mark.slow
def test_a_checkpoint_being_written_is_committed_before_an_error_ends_the_run(tmp_path):
    """"the checkpoint is committed a step or a few later, and always before the run ends or stops on a
    signal or a non-finite loss — and, in a single-process run, before another error ends it"

    torch, a save every step in the background, checkpoints on a roomy disk and the run dir on a tmpfs that
    is shrunk to what it holds after step 2: a few steps later a write of the run's own files (metrics,
    TensorBoard events) meets a full disk and the run ends with that error. The checkpoint of the last step
    trained, which was still being written, is complete (keep_checkpoints=2: it and the one before); no
    temp directory is left."""
    ckpts = tmp_path / "checkpoints"
    with faultlib.tmpfs(tmp_path / "disk", "4m") as resize:
        run = tmp_path / "disk" / "run"
        p = subprocess.Popen([sys.executable, "-m", "launch.train", "hal=torch", "trainer.steps=200",
                              "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2", "trainer.async_save=true",
                              *FAST, f"trainer.checkpoint_dir={ckpts}", f"run_dir={run}"], cwd=ROOT, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            faultlib.wait_for(lambda: (run / "metrics.jsonl").exists() and
                              (run / "metrics.jsonl").read_text().count("\n") >= 2, 300, "step 2", proc=p)
            faultlib.shrink_to_used(tmp_path / "disk", resize)                        # full from here on
            err = p.communicate(timeout=600)[1]
        finally:
            p.kill()
        trained = [m["step"] for m in _complete_lines(run / "metrics.jsonl")]
    assert p.returncode != 0 and f"to {run}" in err, err[-3000:]              # the run dir's disk is full
    assert 2 <= trained[-1] < 200 and trained == list(range(1, trained[-1] + 1))
    names = sorted(p.name for p in ckpts.iterdir() if p.name not in ("owner.json", ".lock"))
    assert all(n.isdigit() for n in names), names                               # no .tmp-<step> left
    steps = sorted(map(int, names))
    assert len(steps) == 2 and steps[1] == steps[0] + 1 and trained[-1] - 1 <= steps[1] <= trained[-1], names
    assert manifest(ckpts / str(steps[1]))["step"] == steps[1]


# -- Checkpoints on object stores ----------------------------------------------------------------------

@pytest.mark.slow
def test_object_store_init_from_to_hf_and_score_through_aws_endpoint_url_s3(s3, tmp_path):
    """"python -m launch.train trainer.init_from=s3://my-bucket/run1 run_dir=outputs/other", "inspect / verify
    / to-hf / score accept s3:// and gs://" and "(`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` for
    S3-compatible servers)" — every command here finds the local S3 server through AWS_ENDPOINT_URL_S3 alone."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL"]
    url = f"s3://{BUCKET}/readme-claims"

    def run(module, *args):
        return ok(subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=600))
    run("launch.train", "hal=torch", "trainer.steps=2", *FAST, f"trainer.checkpoint_dir={url}",
        f"run_dir={tmp_path / 'src'}")
    run("launch.train", "hal=jax", "trainer.steps=3", *FAST, f"trainer.init_from={url}", f"run_dir={tmp_path / 'dst'}")
    assert f"start at step 2 from {url}/2 (step 2, written by torch" in (tmp_path / "dst" / "train.log").read_text()
    assert list(column(tmp_path / "dst", "step")) == [3]
    run("launch.convert", "to-hf", url, str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    np.save(tmp_path / "t.npy", np.random.default_rng(0).integers(0, 257, (2, 16)))
    for model, out in ((url, "remote.npy"), (str(tmp_path / "hf"), "hf.npy")):
        run("launch.convert", "score", model, "--hal", "torch", "--tokens", str(tmp_path / "t.npy"),
            "--out", str(tmp_path / out))
    remote, hf = np.load(tmp_path / "remote.npy"), np.load(tmp_path / "hf.npy")
    assert remote.shape == (2, 16, 257) and np.isfinite(remote).all()
    np.testing.assert_array_equal(remote, hf)            # the store's step 2, scored directly and as exported
