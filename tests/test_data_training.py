"""Real data end to end: prepare_data from JSONL + Parquet + text with a trained BPE, training on both
frameworks with document masking (the same curve), the checkpoint exported with its tokenizer generating
text through transformers; prepare_data killed mid-way leaves a consistent, resumable index; bad input is
one line and leaves nothing behind."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, cli, metrics, train
from tests.tolerances import LOSS_RTOL
from trainer import dataset as ds

pytestmark = pytest.mark.slow

WORDS = ("the model reads packed documents and every window holds several of them while the loss falls "
         "quickly on text it has seen before but slowly on new words").split()


def corpus(root, docs=120, seed=0):
    """Three sources of short documents: JSONL (field `body`), Parquet (column `content`) and text files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    text = [" ".join(rng.choice(WORDS, size=rng.integers(5, 40))) + "." for _ in range(docs)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "a.jsonl", "w") as f:
        for t in text[: docs // 3]:
            f.write(json.dumps({"body": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"content": text[docs // 3: 2 * docs // 3]}), root / "b.parquet")
    (root / "texts").mkdir(exist_ok=True)
    for i, t in enumerate(text[2 * docs // 3:]):
        (root / "texts" / f"{i:03d}.txt").write_text(t)
    return [str(root / "a.jsonl"), str(root / "b.parquet"), str(root / "texts")]


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    inputs = corpus(root / "in")
    r = cli("launch.prepare_data", str(root / "ds"), *inputs, "--tokenizer", "train-bpe:300", "--field", "body",
            "--column", "content", "--workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "ds"


COMMON = ["model=tiny", "trainer.steps=12", "trainer.seq_len=32", "trainer.global_batch=8", "trainer.micro_batch=4",
          "optim.lr=1e-3", "trainer.eval_every=6", "trainer.checkpoint_every=6", "data.vocab=pad128",
          "data.document_mask=true"]


def test_a_prepared_dataset_trains_the_same_on_both_frameworks(bpe_dataset, tmp_path):
    index = json.loads((bpe_dataset / ds.INDEX).read_text())
    assert index["documents"] == 120 and index["tokenizer"]["trained"] == "train-bpe:300"
    runs = {}
    for fw in ("jax", "torch"):
        train(tmp_path / fw, f"hal={fw}", "data=tokens", f"data.path={bpe_dataset}", *COMMON)
        runs[fw] = metrics(tmp_path / fw)
    manifest = json.loads((tmp_path / "jax" / "checkpoints" / "12" / "manifest.json").read_text())
    assert manifest["model"]["vocab_size"] == 384 and manifest["data"]["tokenizer"]["trained"] == "train-bpe:300"
    for key in ("loss", "eval_loss"):
        j = np.array([m[key] for m in runs["jax"] if key in m])
        t = np.array([m[key] for m in runs["torch"] if key in m])
        assert len(j) == len(t) > 0
        assert float(np.max(np.abs(j - t) / np.abs(t))) <= LOSS_RTOL, key
    last = runs["jax"][-1]
    assert last["epoch"] > 0 and last["eval_bpb"] == pytest.approx(
        last["eval_loss"] / np.log(2) * index["tokens"] / index["text_bytes"], rel=1e-6)
    assert (tmp_path / "jax" / "tokenizer.json").read_text() == (bpe_dataset / "tokenizer.json").read_text()


def test_the_export_generates_text_through_transformers(bpe_dataset, tmp_path):
    """to-hf writes the run's tokenizer beside the weights: AutoTokenizer + LlamaForCausalLM generate, and
    greedy decoding follows trichip's own logits token by token."""
    train(tmp_path / "run", "hal=torch", "data=tokens", f"data.path={bpe_dataset}", *COMMON)
    r = cli("launch.convert", "to-hf", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert r.returncode == 0 and "with its tokenizer" in r.stdout, r.stderr[-2000:] + r.stdout
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ids = tok("the model reads", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("the model reads") and len(out[0]) == ids.shape[1] + 8
    from launch.convert import model_logits, read_model
    cfg, params, _ = read_model(tmp_path / "run")
    seq = ids[0].tolist()
    for _ in range(8):
        seq.append(int(model_logits("torch", cfg, params, np.array([seq], np.int32))[0, -1].argmax()))
    assert seq == out[0].tolist()


def test_prepare_data_killed_mid_way_leaves_a_consistent_index_and_resumes(tmp_path):
    """kill -9 while shards are being written: every shard the index lists is whole (size and SHA-256), no
    half shard is listed, and the same command finishes the dataset — equal to one uninterrupted run."""
    inputs = corpus(tmp_path / "in", docs=3000, seed=1)
    args = [*inputs, "--field", "body", "--column", "content", "--shard-tokens", "2000", "--workers", "1",
            "--no-progress"]
    ref = cli("launch.prepare_data", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "launch.prepare_data", str(out), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / ds.INDEX).read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    index = ds.read_index(out)
    assert not index["complete"], "the run finished before it was killed: make the input larger"
    for entry in index["shards"]:
        assert ds.file_sha256(out / entry["file"]) == entry["sha256"]
    r = cli("launch.prepare_data", str(out), *args)
    assert r.returncode == 0, r.stderr
    done, want = ds.read_index(out), ds.read_index(tmp_path / "ref")
    assert done["complete"] and done["tokens"] == want["tokens"] and done["documents"] == want["documents"]
    assert [s["sha256"] for s in done["shards"]] == [s["sha256"] for s in want["shards"]]
    again = cli("launch.prepare_data", str(out), *args)            # complete: nothing to do
    assert again.returncode == 0 and ds.read_index(out) == done


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "ok.txt").write_text("hello world " * 50)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"other": 1}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "tokenizer.json").write_text(json.dumps(json.loads(_wide_tokenizer())))
    cases = [
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl:2 has no string field 'text'"),
        ([str(tmp_path / "nocol.parquet")], "has no column 'text'"),
        ([str(tmp_path / "empty.txt")], "no text to tokenize"),
        ([str(tmp_path / "missing.txt")], "does not exist"),
    ]
    for i, (inputs, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = cli("launch.prepare_data", str(out), *inputs, "--no-progress")
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
        assert not out.exists()
    r = cli("launch.prepare_data", str(tmp_path / "skip"), str(tmp_path / "bad.jsonl"), "--on-missing", "skip",
            "--no-progress")
    assert r.returncode == 0 and "1 document(s) skipped" in r.stdout
    assert ds.read_index(tmp_path / "skip")["skipped"] == [f"{tmp_path / 'bad.jsonl'}:2"]
    # a dataset whose tokenizer is wider than the model's vocabulary: refused before any compute
    r = cli("launch.prepare_data", str(tmp_path / "wide"), str(tmp_path / "ok.txt"), "--tokenizer",
            str(tmp_path / "big"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert ds.read_index(tmp_path / "wide")["dtype"] == "uint32"
    r = cli("launch.train", "hal=jax", "model=tiny", "data=tokens", f"data.path={tmp_path / 'wide'}",
            "trainer.steps=1", "trainer.seq_len=8", f"run_dir={tmp_path / 'run'}")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "model.vocab_size is 257" in lines[0], r.stderr[-2000:]


def _wide_tokenizer() -> str:
    """A 70,000-token word-level tokenizer (ids past uint16) with an end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab.update({"hello": 70_000, "world": 70_001, "[UNK]": 70_002, "<|endoftext|>": 70_003})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def test_a_mixture_reports_each_source(bpe_dataset, tmp_path):
    """Two sources (the same tokenizer): per-source epochs and held-out losses, the overall eval loss their
    weighted mean, and the run resumes to the same curve from its checkpoint (the step is all it needs)."""
    from trainer.prepare import Options, build
    inputs = corpus(tmp_path / "in", docs=60, seed=5)
    build(tmp_path / "other", Options(tokenizer=str(bpe_dataset / "tokenizer.json"), inputs=inputs, field="body",
                                      column="content", progress=False))
    web = f"{{path: '{bpe_dataset}', weight: 3, name: web}}"
    code = f"{{path: '{tmp_path / 'other'}', weight: 1, name: code}}"
    sources = f"data.sources=[{web}, {code}]"
    args = ["hal=torch", "data=mixture", sources, *COMMON]
    train(tmp_path / "run", *args)
    rows = metrics(tmp_path / "run")
    last = rows[-1]
    assert {"epoch/web", "epoch/code", "eval_loss/web", "eval_loss/code", "eval_bpb/web"} <= set(last)
    assert last["eval_loss"] == pytest.approx(0.75 * last["eval_loss/web"] + 0.25 * last["eval_loss/code"])
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "12")
    assert train(tmp_path / "run", *args)["start_step"] == 6
    again = metrics(tmp_path / "run")
    assert [m["loss"] for m in again] == [m["loss"] for m in rows]          # bitwise: same rows, same order
