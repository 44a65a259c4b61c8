"""Checkpoints on object stores: s3:// against a local moto server (and gs:// against a local emulator,
where gcp-storage-emulator is installed). Training output, kill -9 and resume on the other framework,
`launch.convert copy` between stores with verification on arrival, damaged and incomplete checkpoints,
missing credentials and unknown buckets."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, cli, metrics
from hal import UserError
from tests.tolerances import LOSS_RTOL as RTOL

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="pip install 'moto[server]'")

BUCKET = "trichip-test"
STEPS = 24
FAST = ["trainer.global_batch=4", "trainer.seq_len=32", "optim.lr=5e-4", "optim.warmup_steps=4",
        "trainer.log_every=6", "trainer.eval_every=6", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2",
        f"trainer.steps={STEPS}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(args: list[str], port: int, log: Path, hung: float = 900) -> subprocess.Popen:
    """Start a server process (its output to `log`: a pipe nobody reads would fill and stall it) and wait
    for one of two events: it accepts connections on 127.0.0.1:port (returned), or it exits (an error
    with its log). `hung` bounds only a server that does neither; a slow start on a loaded machine waits."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + hung
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the server neither listened nor exited in {hung} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* environment points this process and the
    commands it runs at it (and nowhere else: no ~/.aws files, no instance metadata lookups)."""
    port, aws = _free_port(), tmp_path_factory.mktemp("aws")
    server = _start_server(["moto.server", "-H", "127.0.0.1", "-p", str(port)], port, aws / "moto.log")
    empty = aws / "empty"
    empty.write_text("")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                        "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
                mp.delenv(key, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
            mp.setenv("AWS_CONFIG_FILE", str(empty))
            from trainer import storage
            storage.forget_stores()
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            yield client
            storage.forget_stores()
    finally:
        server.kill()
        server.wait()


def keys(client, prefix):
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def remote_steps(client, prefix):
    """{step: has a manifest} of the step prefixes under prefix/."""
    steps = {}
    for k in keys(client, prefix + "/"):
        step = k[len(prefix) + 1:].split("/")[0]
        if step.isdigit():
            steps[int(step)] = steps.get(int(step), False) or k.endswith(f"/{step}/manifest.json")
    return steps


def copy_prefix(client, src, dst):
    for k in keys(client, src + "/"):       # get + put: moto's copy_object keeps a checksum that then mismatches
        body = client.get_object(Bucket=BUCKET, Key=k)["Body"].read()
        client.put_object(Bucket=BUCKET, Key=dst + k[len(src):], Body=body)


def flip_largest_data_object(client, prefix):
    """The biggest object of the tensors (a chunk of the largest tensor; orbax's metadata files are small)."""
    data = [(o["Size"], o["Key"]) for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
            for o in page.get("Contents", []) if "/state/" in o["Key"]]
    key = max(data)[1]
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x10
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    return key


def one_line(r, code, stream="stderr"):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    text = getattr(r, stream)
    prefix = "error: " if stream == "stderr" else "FAIL: "
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in r.stderr, (r.stdout[-2000:], r.stderr[-3000:])
    return lines[0]


def losses(run, key="loss"):
    return np.array([m[key] for m in metrics(run) if key in m])


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    """An uninterrupted local JAX run (the reference), and the same run with checkpoints on s3 that is
    killed with SIGKILL mid-way and resumed on torch from s3."""
    root = tmp_path_factory.mktemp("s3run")
    ref, run = root / "ref", root / "run"
    train = [sys.executable, "-m", "launch.train"]
    p_ref = subprocess.Popen([*train, "hal=jax", *FAST, f"run_dir={ref}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    p = subprocess.Popen([*train, "hal=jax", *FAST, f"trainer.checkpoint_dir=s3://{BUCKET}/run1", f"run_dir={run}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:          # kill once it trained 7 steps and at least one checkpoint is complete on s3
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline, "the s3 run made no progress"
        try:
            done = len(metrics(run))
        except (FileNotFoundError, json.JSONDecodeError):
            done = 0
        if done >= 7 and any(remote_steps(s3, "run1").values()):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = len(metrics(run))
    assert killed_at < STEPS
    before = remote_steps(s3, "run1")
    r = cli("launch.train", "hal=torch", *FAST, f"trainer.checkpoint_dir=s3://{BUCKET}/run1", f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert p_ref.wait(timeout=300) == 0, p_ref.stderr.read()[-3000:]
    return {"ref": ref, "run": run, "killed_at": killed_at, "before": before}


def test_train_on_s3_killed_then_resumed_on_torch(s3, s3_run):
    run, ref = s3_run["run"], s3_run["ref"]
    resumed_from = max(step for step, complete in s3_run["before"].items() if complete)
    log = (run / "train.log").read_text()
    assert f"start at step {resumed_from} from s3://{BUCKET}/run1/{resumed_from} (step {resumed_from}, " \
           f"written by jax" in log
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    got, want = losses(run), losses(ref)
    np.testing.assert_array_equal(got[:resumed_from], want[:resumed_from])       # jax both, before the kill
    gap = (np.abs(got - want) / np.abs(want)).max()
    print(f"max rel gap jax->torch on s3: {gap:.2e} (bound {RTOL:.0e})")
    assert gap <= RTOL                                                           # torch after it
    ge, we = losses(run, "eval_loss"), losses(ref, "eval_loss")
    assert len(ge) == len(we) == STEPS // 6 and (np.abs(ge - we) / np.abs(we)).max() <= RTOL
    # keep-last-2 on the store, every one complete; no local checkpoint, staging or download left behind
    assert remote_steps(s3, "run1") == {STEPS - 2: True, STEPS: True}
    assert not (run / "checkpoints").exists()
    assert not (run / ".staging").exists() and not (run / ".remote-cache").exists()
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"run1/{STEPS}/manifest.json")["Body"].read())
    assert manifest["writer"]["framework"] == "torch" and manifest["step"] == STEPS


def test_copy_s3_to_local_to_s3_verified(s3, s3_run, tmp_path):
    local = tmp_path / "local"
    r = cli("launch.convert", "copy", f"s3://{BUCKET}/run1", str(local))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"copied s3://{BUCKET}/run1/{STEPS} to {local / str(STEPS)}: ") and " match " in r.stdout
    assert sorted(p.name for p in local.iterdir()) == [str(STEPS)]              # no temp dir left
    # the run dir names where its checkpoints are: copy from it to another prefix
    r = cli("launch.convert", "copy", str(s3_run["run"]), f"s3://{BUCKET}/copies")
    assert r.returncode == 0, r.stderr[-3000:]
    # and a local checkpoint back up
    r = cli("launch.convert", "copy", str(local), f"s3://{BUCKET}/back")
    assert r.returncode == 0, r.stderr[-3000:]
    assert keys(s3, "back/") == [k.replace("run1/", "back/", 1) for k in keys(s3, f"run1/{STEPS}/")]
    r = cli("launch.convert", "copy", str(local), f"s3://{BUCKET}/back")
    assert "already exists" in one_line(r, 2)
    r = cli("launch.convert", "inspect", f"s3://{BUCKET}/back")
    assert r.returncode == 0 and r.stdout.startswith(f"checkpoint   s3://{BUCKET}/back/{STEPS}\n"), r.stderr[-2000:]


def test_damaged_remote_checkpoint_is_detected(s3, s3_run, tmp_path):
    copy_prefix(s3, f"run1/{STEPS}", f"damaged/{STEPS}")
    flip_largest_data_object(s3, "damaged")
    r = cli("launch.convert", "verify", f"s3://{BUCKET}/damaged")
    assert "digest" in one_line(r, 1, "stdout")
    r = cli("launch.convert", "copy", f"s3://{BUCKET}/damaged", f"s3://{BUCKET}/damaged-copy")
    line = one_line(r, 1, "stdout")
    assert f"s3://{BUCKET}/damaged-copy/{STEPS}" in line and "removed" in line
    assert keys(s3, "damaged-copy/") == []                                      # nothing left at the target
    r = cli("launch.convert", "copy", f"s3://{BUCKET}/damaged", str(tmp_path / "dst"))
    assert "digest" in one_line(r, 1, "stdout")
    assert not (tmp_path / "dst").exists()


def test_resume_skips_damaged_and_incomplete_remote_checkpoints(s3, s3_run, tmp_path):
    """run2/: 22 intact, 24 with a damaged tensor file, 26 without its manifest (an upload cut short)."""
    copy_prefix(s3, f"run1/{STEPS - 2}", f"run2/{STEPS - 2}")
    copy_prefix(s3, f"run1/{STEPS}", f"run2/{STEPS}")
    copy_prefix(s3, f"run1/{STEPS}", f"run2/{STEPS + 2}")
    flip_largest_data_object(s3, f"run2/{STEPS}")
    s3.delete_object(Bucket=BUCKET, Key=f"run2/{STEPS + 2}/manifest.json")
    run = tmp_path / "run"
    longer = [a for a in FAST if not a.startswith("trainer.steps=")] + [f"trainer.steps={STEPS + 4}"]
    r = cli("launch.train", "hal=jax", *longer, f"trainer.checkpoint_dir=s3://{BUCKET}/run2", f"run_dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run / "train.log").read_text()
    before_start = log.split("start at step")[0]
    assert f"s3://{BUCKET}/run2/{STEPS}" in before_start and "falling back to the previous checkpoint" in before_start
    assert f"s3://{BUCKET}/run2/{STEPS + 2}" not in before_start                 # never considered
    assert f"start at step {STEPS - 2} from s3://{BUCKET}/run2/{STEPS - 2} " in log
    # it trained on, replaced the damaged and the incomplete checkpoints, and pruned to the last two
    assert remote_steps(s3, "run2") == {STEPS + 2: True, STEPS + 4: True}
    assert [m["step"] for m in metrics(run)] == list(range(STEPS - 1, STEPS + 5))


def test_missing_credentials_one_line_and_nothing_written(s3, s3_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    run = subprocess.run([sys.executable, "-m", "launch.train", "hal=jax", *FAST,
                          f"trainer.checkpoint_dir=s3://{BUCKET}/nocreds", f"run_dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = one_line(run, 2)
    assert "no AWS credentials" in line and "AWS_ACCESS_KEY_ID" in line and "AWS_SECRET_ACCESS_KEY" in line
    copy = subprocess.run([sys.executable, "-m", "launch.convert", "copy", str(s3_run["ref"]),
                           f"s3://{BUCKET}/nocreds"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "AWS_ACCESS_KEY_ID" in one_line(copy, 2)
    assert keys(s3, "nocreds") == []


def test_unknown_bucket_one_line(s3, tmp_path):
    r = cli("launch.train", "hal=torch", *FAST, "trainer.checkpoint_dir=s3://no-such-bucket-here/run",
            f"run_dir={tmp_path / 'run'}")
    assert "no-such-bucket-here" in one_line(r, 2) and "does not exist" in r.stderr
    r = cli("launch.convert", "inspect", "s3://no-such-bucket-here/run")
    assert "does not exist" in one_line(r, 2)


# -- the store layer, in process (no training) -------------------------------------------------------

def _fake_checkpoint(path: Path, step: int) -> Path:
    (path / "state" / "d").mkdir(parents=True)
    (path / "state" / "d" / "blob").write_bytes(os.urandom(3000))
    (path / "config.yaml").write_text("a: 1\n")
    (path / "manifest.json").write_text(json.dumps({"format_version": 1, "step": step,
                                                         "tensors": {"d": {"shape": [1], "dtype": "uint8", "digest": 0}}}))
    return path


def _store_contract(url: str, tmp_path: Path, monkeypatch) -> None:
    """Upload (manifest last), list, resolve, fetch and prune (manifest first; abandoned uploads too)."""
    from trainer import checkpoint, storage
    root = storage.StoreDir(url)
    store = root.store
    order = []
    upload_file, delete = type(store).upload_file, type(store).delete
    monkeypatch.setattr(type(store), "upload_file", lambda self, local, key: (order.append(("put", key)),
                                                                            upload_file(self, local, key)))
    monkeypatch.setattr(type(store), "delete", lambda self, ks: (order.append(("del", tuple(ks))), delete(self, ks)))
    for step in (1, 2, 3):
        checkpoint.upload(_fake_checkpoint(tmp_path / str(step), step), root / str(step))
        assert order[-1] == ("put", root.join_key(f"{step}/manifest.json"))      # the commit marker last
    checkpoint.upload(tmp_path / "3", root / "4", commit=False)                   # an upload cut short
    assert checkpoint.list_steps(root) == [1, 2, 3]
    assert checkpoint.resolve(url) == root / "3" and checkpoint.read_manifest(root / "2")["step"] == 2
    with checkpoint.fetch(root / "2") as local:
        assert (local / "state" / "d" / "blob").read_bytes() == (tmp_path / "2" / "state" / "d" / "blob").read_bytes()
    assert not local.exists()
    order.clear()
    checkpoint.prune(root, keep=2)
    assert checkpoint.list_steps(root) == [2, 3]
    assert order[0] == ("del", (root.join_key("1/manifest.json"),))               # the manifest goes first
    assert store.list_dirs(root.key) == ["2", "3"]                                 # 4 (no manifest) removed
    with pytest.raises(checkpoint.UserError, match="not a trichip checkpoint"):
        checkpoint.resolve(f"{url}/nothing-here")


def test_store_contract_s3(s3, tmp_path, monkeypatch):
    _store_contract(f"s3://{BUCKET}/contract", tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 (pip install gcp-storage-emulator google-cloud-storage)."""
    pytest.importorskip("gcp_storage_emulator", reason="pip install gcp-storage-emulator")
    storage = pytest.importorskip("google.cloud.storage", reason="pip install google-cloud-storage")
    from google.auth.credentials import AnonymousCredentials
    port = _free_port()
    server = _start_server(["gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
                           port, tmp_path_factory.mktemp("gcs") / "emulator.log")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            from trainer.storage import forget_stores
            forget_stores()
            storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket("trichip-gcs")
            yield "trichip-gcs"
            forget_stores()
    finally:
        server.kill()
        server.wait()


def test_store_contract_gcs(gcs, tmp_path, monkeypatch):
    _store_contract(f"gs://{gcs}/contract", tmp_path, monkeypatch)
    from trainer import checkpoint
    with pytest.raises(checkpoint.UserError, match="does not exist"):
        checkpoint.checkpoint_root("gs://no-such-bucket-here/x", tmp_path)


def test_a_dataset_on_s3_is_staged_verified_and_read_like_a_local_one(s3, tmp_path, monkeypatch):
    """data.path=s3://...: the index, tokenizer and shards come through the store layer into the cache,
    each shard checked against the index's size and SHA-256; batches equal the local dataset's. A shard
    changed on the store is a StorageError naming it, not training on other data."""
    from hal import StorageError
    from trainer.data import TokenData
    from trainer.prepare import Options, build
    (tmp_path / "texts").mkdir()
    for i in range(20):
        (tmp_path / "texts" / f"{i:02d}.txt").write_text(f"object stores hold corpus part {i}; it is staged. " * 20)
    build(tmp_path / "ds", Options(inputs=[str(tmp_path / "texts")], shard_tokens=5000, progress=False))
    for f in sorted((tmp_path / "ds").iterdir()):
        s3.upload_file(str(f), BUCKET, f"datasets/ds/{f.name}")
    monkeypatch.setenv("TRICHIP_CACHE", str(tmp_path / "cache"))
    local, remote = TokenData(str(tmp_path / "ds"), 16, 3), TokenData(f"s3://{BUCKET}/datasets/ds", 16, 3)
    assert len(remote.sources[0].stream.shards) == 4
    for step in range(5):
        assert np.array_equal(remote.train_batch(step, 4), local.train_batch(step, 4))
    body = bytearray(s3.get_object(Bucket=BUCKET, Key="datasets/ds/shard-00002.npy")["Body"].read())
    body[-3] ^= 1
    s3.put_object(Bucket=BUCKET, Key="datasets/ds/shard-00002.npy", Body=bytes(body))
    TokenData(f"s3://{BUCKET}/datasets/ds", 16, 3)          # staged and checked once: the cache is used
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(StorageError, match="shard-00002.npy does not match its index"):
        TokenData(f"s3://{BUCKET}/datasets/ds", 16, 3)
    with pytest.raises(UserError, match="is not a dataset"):
        TokenData(f"s3://{BUCKET}/datasets/none", 16, 3)
