"""Looking inside a run: profiler traces opened with the readers their tools use (JAX's ProfileData for the
XSpace protobuf TensorBoard's profile plugin reads, JSON for the Chrome/Perfetto traces), memory profiles,
Weights & Biases offline run files and MLflow file-store runs read back and compared with metrics.jsonl,
TensorBoard text, peak RSS in run.json, and out-of-memory errors from real allocation failures."""
import ast
import glob
import gzip
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hal import OptimizerSpec, UserError, make_backend
from hal.profile import STEP_NAME, is_out_of_memory, make_profiler
from models.spec import SIZES
from tests.conftest import ROOT, metrics, train
from trainer.loggers import Loggers, _escape
from trainer.observe import out_of_memory_message, peak_flops, scalar_values


def _wandb_records(path):
    """The records of a W&B offline run file (run-<id>.wandb), parsed with wandb's own protobuf classes. The
    file is a 7-byte header (":W&B", magic, version), then LevelDB log blocks of 32 KiB: each chunk is a
    4-byte checksum, 2-byte length, 1-byte type (1 full, 2 first, 3 middle, 4 last) and its data."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, block, pending, records = open(path, "rb").read(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:             # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _pprof_strings(path):
    """The string table (field 6) of a gzipped pprof Profile protobuf, read off the wire format."""
    buf, i, out = gzip.decompress(open(path, "rb").read()), 0, []

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 2:
            n = varint()
            if field == 6:
                out.append(buf[i:i + n].decode())
            i += n
        else:
            i += 8 if wire == 1 else 4
    return out


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """W&B offline with its own directories under tmp_path; MLflow at its default (a file store in the run dir)."""
    for var, sub in (("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)


@pytest.mark.slow
def test_jax_run_profile_memory_trackers_and_samples(tmp_path, tracker_env, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="trichip")
    run = tmp_path / "run"
    train(run, "hal=jax", "trainer.steps=4", "trainer.seq_len=32", "trainer.global_batch=4", "trainer.eval_every=2",
          "trainer.eval_batches=1", "trainer.profile.steps=[2,3]", "trainer.profile.memory=true",
          "trainer.loggers=[tensorboard,wandb,mlflow]", "trainer.sample_every=2", "trainer.sample_tokens=4")
    rows = metrics(run)
    assert [m["step"] for m in rows if m.get("profiled")] == [2, 3]
    expected = {m["step"]: scalar_values(m) for m in rows}
    assert "eval/loss" in expected[2] and "train/loss" in expected[1]

    # the XSpace protobuf TensorBoard's profile plugin reads, through JAX's own reader: the annotated steps
    from jax.profiler import ProfileData
    [xplane] = glob.glob(str(run / "profile/process0/plugins/profile/*/*.xplane.pb"))
    steps = [dict(ev.stats)["step_num"] for plane in ProfileData.from_file(xplane).planes
             for line in plane.lines for ev in line.events if ev.name == STEP_NAME]
    assert sorted(steps) == [2, 3]
    [perfetto] = glob.glob(str(run / "profile/process0/plugins/profile/*/*.trace.json.gz"))
    events = json.loads(gzip.decompress(open(perfetto, "rb").read()))["traceEvents"]
    assert sum(e.get("name") == STEP_NAME for e in events) == 2
    strings = _pprof_strings(run / "profile/memory-process0-step3.prof")
    assert {"space", "bytes", "buffer"} <= set(strings) and any(s.endswith("jax_backend.py") for s in strings)

    record = json.loads((run / "run.json").read_text())
    peak = record["last_run"]["peak_rss_bytes"]
    assert 50 << 20 < peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    samples = {int(line.split("sample at step ")[1].split(":")[0]): line.split(": ", 1)[1]
               for line in caplog.text.splitlines() if "sample at step" in line}
    assert sorted(samples) == [2, 4]

    # Weights & Biases: the offline run file holds the same scalars at the same steps, and the config
    [wandb_file] = glob.glob(str(run / "wandb/offline-run-*/run-*.wandb"))
    assert record["run_id"] in wandb_file
    records = _wandb_records(wandb_file)
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            logged.setdefault(items["_step"], {}).update(items)
    for step, values in expected.items():
        assert {k: logged[step][k] for k in values} == values
    html = {s: v["sample/path"] for s, v in logged.items() if "sample/path" in v}
    assert sorted(html) == [2, 4]
    page = (Path(wandb_file).parent / "files" / html[4]).read_text()
    assert _escape(ast.literal_eval(samples[4])) in page
    config = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert config["trainer"]["steps"] == 4 and config["trainer"]["profile"]["steps"] == [2, 3]

    # MLflow, read back through its own client from the file store in the run dir
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    exp = client.get_experiment_by_name("trichip")
    [found] = client.search_runs([exp.experiment_id], filter_string=f"tags.`trichip.run_id` = '{record['run_id']}'")
    for tag in expected[1]:
        history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, tag)}
        assert history == {s: v[tag] for s, v in expected.items() if tag in v}, tag
    assert found.data.params["trainer.steps"] == "4" and found.data.params["trainer.loggers"] == \
        '["tensorboard", "wandb", "mlflow"]'
    local = client.download_artifacts(found.info.run_id, "", str(tmp_path / "artifacts"))
    assert json.loads(open(f"{local}/config.json").read())["trainer"]["sample_every"] == 2
    assert open(f"{local}/sample/step-00000004.txt").read() == ast.literal_eval(samples[4])

    # TensorBoard: the config and the samples as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(tag)}
             for tag in events.Tags()["tensors"]}
    assert "steps: 4" in texts["config/text_summary"][0]
    assert sorted(texts["sample/text_summary"]) == [2, 4]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_torch_trace_is_chrome_json_with_the_steps_shapes_and_allocations(tmp_path):
    run = tmp_path / "run"
    train(run, "hal=torch", "trainer.steps=3", "trainer.seq_len=32", "trainer.global_batch=4", "trainer.eval_every=0",
          "trainer.profile.steps=[2,3]", "trainer.profile.memory=true", "trainer.tensorboard=false")
    assert [m["step"] for m in metrics(run) if m.get("profiled")] == [2, 3]
    [trace] = glob.glob(str(run / "profile/torch-process0-steps2-3.pt.trace.json"))
    events = json.loads(open(trace).read())["traceEvents"]
    names = [e.get("name") for e in events]
    assert names.count(STEP_NAME) == 2
    assert any(e.get("name") == "aten::mm" and e.get("args", {}).get("Input Dims") for e in events)  # shapes
    assert any(e.get("cat") == "python_function" for e in events)                                   # stacks
    assert any(e.get("name") == "[memory]" for e in events)                                          # allocations
    assert "peak_rss_bytes" in json.loads((run / "run.json").read_text())["last_run"]


def test_profile_window_is_checked():
    backend = make_backend({"framework": "torch"}, SIZES["tiny"], OptimizerSpec())
    for steps in ([3], [0, 2], [4, 2], [1, 2, 3]):
        with pytest.raises(UserError, match=r"trainer.profile.steps must be \[first, last\]"):
            make_profiler(backend, "/nonexistent", steps, False, 0, 10)
    with pytest.raises(UserError, match="needs a window"):
        make_profiler(backend, "/nonexistent", [], True, 0, 10)
    assert make_profiler(backend, "/nonexistent", [2, 3], False, 5, 10) is None       # resumed past the window
    assert make_profiler(backend, "/nonexistent", [12, 13], False, 0, 10) is None     # after the last step
    assert make_profiler(backend, "/nonexistent", [8, 20], False, 0, 10).last == 10


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line_naming_its_package(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)        # `import name` raises ImportError, as when not installed
    with pytest.raises(UserError) as e:
        Loggers(["tensorboard", name], tmp_path, "0" * 32)
    assert f"pip install {name}" in str(e.value) and "\n" not in str(e.value)


def test_out_of_memory_is_told_from_real_allocation_failures():
    import jax.numpy as jnp
    import torch
    failures = []
    for allocate in (lambda: jnp.zeros((1 << 42,), jnp.float32).block_until_ready(),   # 16 TiB: XLA refuses
                     lambda: torch.empty(1 << 50, dtype=torch.uint8),                   # 1 PiB: malloc refuses
                     lambda: np.empty(1 << 50, np.uint8)):
        with pytest.raises(Exception) as e:
            allocate()
        failures.append(e.value)
    assert [is_out_of_memory(e) for e in failures] == [True, True, True]
    assert not any(is_out_of_memory(e) for e in (ValueError("bad shape"), RuntimeError("CUDA error: launch failed"),
                                                 KeyError("RESOURCE_EXHAUSTED")))


def test_fp8_mfu_counts_against_the_bf16_peak():
    """fp8 runs float8 only in the blocks' projections: its MFU is against the dense bf16 peak, as bf16's is."""
    kind = "NVIDIA H100 80GB HBM3"
    assert peak_flops(kind, "fp8") == peak_flops(kind, "bf16") == 989e12
    assert peak_flops(kind, "fp32") == 67e12
    assert peak_flops("TPU v5 lite", "fp8") == 197e12 and peak_flops("cpu", "fp8") is None


def test_out_of_memory_message_says_what_to_change():
    line = out_of_memory_message(7, micro_batch=8, global_batch=24, seq_len=512, remat=False,
                                 device_peak=int(75.5 * 2**30), cause="RESOURCE_EXHAUSTED: Out of memory")
    assert line.startswith("out of memory in step 7 with micro-batch 8 x 512 tokens, remat off, device peak 75.50 GiB")
    assert "trainer.micro_batch=4 " in line and "trainer.remat=true" in line and "\n" not in line
    line = out_of_memory_message(1, micro_batch=1, global_batch=4, seq_len=4096, remat=True, device_peak=None,
                                 cause="DefaultCPUAllocator: can't allocate memory")
    assert "remat on, process peak RSS" in line and "micro_batch=" not in line and "trainer.remat" not in line
    assert "seq_len" in line
    # an odd micro-batch: the largest at most half of 9 that divides the global batch of 27 is 3
    assert "trainer.micro_batch=3 " in out_of_memory_message(1, 9, 27, 8, True, None, "x")


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_an_oversized_micro_batch_ends_the_run_with_the_out_of_memory_line(tmp_path, framework):
    """The whole logits (trainer.loss_chunk=0) of 64 x 1024 tokens over a 262,144-token vocabulary need one
    64 GiB buffer: under a 48 GiB address-space limit the allocation fails at once (nothing is touched), and
    the run ends with one line."""
    limited = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (48 << 30, 48 << 30)); "
               "os.execv(sys.executable, [sys.executable, '-m', 'launch.train', *sys.argv[1:]])")
    r = subprocess.run([sys.executable, "-c", limited, f"hal={framework}", "trainer.steps=2",
                        "trainer.seq_len=1024", "trainer.global_batch=128", "trainer.micro_batch=64",
                        "model.vocab_size=262144", "trainer.loss_chunk=0", "trainer.eval_every=0",
                        "trainer.tensorboard=false",
                        f"run_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert errors[0].startswith("error: out of memory in step 1 with micro-batch 64 x 1024 tokens, remat off, "
                                "process peak RSS ")
    assert "try trainer.micro_batch=32 (gradient accumulation keeps global_batch 128)" in errors[0]
    assert "trainer.remat=true" in errors[0]


def test_tensorboard_scalars_from_a_process_without_torch(tmp_path):
    """A JAX run's TensorBoard writer does not load torch (tensorboardX would import it at its own import),
    and its events read back; a process that has loaded torch writes the same way."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    probe = ("import sys; from trainer.observe import Scalars\n"
             "pre = sys.argv[2] == 'torch'\n"
             "if pre: import torch\n"
             "s = Scalars(sys.argv[1]); s.add(3, {'loss': 2.5}); s.close()\n"
             "print('torch' in sys.modules)\n")
    for preload, loads_torch in (("none", "False"), ("torch", "True")):
        run = tmp_path / preload
        r = subprocess.run([sys.executable, "-c", probe, str(run), preload], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.split() == [loads_torch], r.stderr[-2000:]
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 2.5)]
