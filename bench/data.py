"""The data layer's benchmarks: loader throughput, prepare_data against a bare tokenizer loop, and what a
trained BPE buys over bytes at equal training FLOPs.

    python bench/data.py                                     # loader + prepare tables (~2 min on 2 cores)
    python bench/data.py --tables quality --steps 150        # the quality row (small model, two trainings)

Every ratio is measured alternately in one run (A, B, A, B, ...), as medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections.common import Report, compose, f0, f2, f3, med, now  # noqa: E402
from models.spec import SIZES, LlamaConfig, flops_per_token  # noqa: E402
from trainer import tokenizer as tk  # noqa: E402
from trainer.data import TokenData, builtin_text  # noqa: E402
from trainer.prepare import Options, build  # noqa: E402

H200_1B_TOKENS_PER_S = 66_000      # what the 1B model consumes on one H200 (bench/RESULTS_H200.md)


def loader_table(report: Report, opts, tmp: Path) -> None:
    """Tokens/s of TokenData.train_batch at the 1B shape's batch (16 x 2048) on one core."""
    docs = tmp / "docs"
    build(tmp / "ds", Options(inputs=[str(docs)], progress=False, workers=1))
    single = TokenData(str(tmp / "ds"), 2048, 0)
    mix = TokenData(None, 2048, 0, sources=[{"path": str(tmp / "ds"), "name": n, "weight": w}
                                            for n, w in (("a", 0.7), ("b", 0.2), ("c", 0.1))])
    steps = lambda r: range(r * 50, r * 50 + 50)  # noqa: E731  (50 new steps a round)
    cases = {"one source, all rows": lambda r: [single.train_batch(s, 16) for s in steps(r)],
             "one source, half the rows (a process of 2)":
                 lambda r: [single.train_batch(s, 16, slice(0, 8)) for s in steps(r)],
             "mixture of 3 (0.7/0.2/0.1)": lambda r: [mix.train_batch(s, 16) for s in steps(r)]}
    rows = []
    times = alternate(cases, opts.rounds)
    for name, ts in times.items():
        ts = [t / 50 for t in ts]
        rows_read = 8 if "half" in name else 16
        rate = rows_read * 2049 / med(ts)
        rows.append([name, f0(rate), f0(rate / H200_1B_TOKENS_PER_S) + "x", "yes" if rate >= 50 * H200_1B_TOKENS_PER_S
                     else "no"])
    report.table("Data 1. Loader throughput (tokens/s, one process, one core)",
                 ["case", "tokens/s", "vs 66k tokens/s (1B on one H200)", "goal >= 50x"], rows,
                 f"TokenData.train_batch at global batch 16 x seq 2048 (+1) from a {opts.corpus_mb} MB byte-level "
                 f"dataset (memory-mapped shards, page cache warm), median over {opts.rounds} rounds of 50 steps, "
                 f"cases alternated.")


def prepare_table(report: Report, opts, tmp: Path) -> None:
    """prepare_data (a BPE tokenizer.json) against a bare tokenizers encode_batch loop over the same files."""
    docs = tmp / "docs"
    tok = tk.train_bpe(4096, [builtin_text("python_docs")], tmp / "bpe")
    files = sorted(docs.glob("*.jsonl"))
    total_bytes = sum(f.stat().st_size for f in files)

    def bare(_round):
        n = 0
        for f in files:
            texts = [json.loads(line)["text"] for line in f.open()]
            n += sum(len(e.ids) for e in tok.tok.encode_batch_fast(texts, add_special_tokens=False))
        return n

    def ours(workers):
        def run(_round):
            out = tmp / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            return build(out, Options(tokenizer=str(tok.path), inputs=[str(docs)], progress=False,
                                      workers=workers))["tokens"]
        return run

    cases = {"tokenizers encode_batch loop (bare)": bare, "prepare_data --workers 1": ours(1),
             f"prepare_data --workers {os.cpu_count()}": ours(os.cpu_count())}
    times = alternate(cases, opts.rounds)
    base = med(times["tokenizers encode_batch loop (bare)"])
    rows = [[name, f3(med(ts)), f"{total_bytes / med(ts) / 1e6:.1f}", f2(base / med(ts))]
            for name, ts in times.items()]
    report.table("Data 2. prepare_data against a bare tokenizer loop (BPE 4096)",
                 ["how", "seconds", "MB/s of JSONL", "speed vs bare (goal >= 0.9)"], rows,
                 f"{len(files)} JSONL files, {total_bytes / 1e6:.1f} MB; the bare loop parses the JSON and calls "
                 f"encode_batch_fast (Rust threads on every core); prepare_data also appends EOS, writes shards "
                 f"(fsync) and the index. Median of {opts.rounds} rounds, alternated.")


def quality_table(report: Report, opts, tmp: Path) -> None:
    """Held-out bits per byte of the `small` model on the built-in corpus: bytes vs a BPE-4096 tokenizer,
    at equal training FLOPs (the BPE run takes fewer steps for its bigger vocabulary)."""
    from trainer.loop import train
    base = SIZES[opts.model]
    bpe_vocab = tk.padded_vocab(4096)
    fpt_bytes = flops_per_token(base, opts.seq_len)
    fpt_bpe = flops_per_token(LlamaConfig(**dict(base.to_dict(), vocab_size=bpe_vocab,
                                                 rope_scaling=None)), opts.seq_len)
    steps = {"bytes": opts.steps, "train-bpe:4096": max(1, round(opts.steps * fpt_bytes / fpt_bpe))}
    rows = []
    for tok, n in steps.items():
        run = tmp / f"q-{tok.replace(':', '')}"
        cfg = compose([f"hal={opts.framework}", f"model={opts.model}", f"trainer.steps={n}",
                       f"trainer.seq_len={opts.seq_len}", f"trainer.eval_every={n}", "trainer.checkpoint_every=0",
                       "trainer.eval_batches=16", f"data.tokenizer={tok}", "data.vocab=pad128"
                       if tok != "bytes" else "data.vocab=check"])
        t = now()
        train(cfg, run)
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        fpt = fpt_bytes if tok == "bytes" else fpt_bpe
        rows.append([tok, n, f"{n * cfg['trainer']['global_batch'] * opts.seq_len * fpt / 1e15:.3f}",
                     f3(last["eval_loss"]), f3(last["eval_bpb"]), f0(now() - t)])
    report.table(f"Data 3. Tokenizer quality at equal training FLOPs ({opts.model}, built-in corpus)",
                 ["tokenizer", "steps", "training PFLOP", "eval loss (nats/token)", "eval bits/byte", "seconds"],
                 rows, f"hal={opts.framework}, seq_len {opts.seq_len}, global batch 16, the default optimizer "
                 f"and schedule; eval on 16 held-out batches at the end. Bits per byte divide by each dataset's "
                 f"UTF-8 bytes per token, so the two rows compare.")


def alternate(cases: dict, rounds: int) -> dict:
    """{name: [seconds of each round]}: every case once per round (case(round)), in alternating order."""
    times = {k: [] for k in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            t = now()
            cases[name](r)
            times[name].append(now() - t)
    return times


def _json_corpus(out: Path, megabytes: int) -> None:
    """JSONL files of paragraphs from the built-in corpus, repeated to `megabytes` MB."""
    paragraphs = [p for p in builtin_text("python_docs").split("\n\n") if p.strip()]
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    size, i = 0, 0
    while size < megabytes * 1_000_000:
        with open(out / f"part-{i:03d}.jsonl", "w") as f:
            for p in rng.permutation(len(paragraphs))[:4000]:
                line = json.dumps({"text": paragraphs[p]}) + "\n"
                f.write(line)
                size += len(line)
        i += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--corpus-mb", type=int, default=24)
    p.add_argument("--tables", default="loader,prepare", help="comma-separated: loader, prepare, quality "
                   "(quality trains two models: minutes)")
    p.add_argument("--model", default="small")
    p.add_argument("--framework", default="torch")
    p.add_argument("--steps", type=int, default=300, help="steps of the byte-level run")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default=None, help="append the tables to this Markdown file")
    opts = p.parse_args(argv)
    report = Report()
    tmp = Path(tempfile.mkdtemp(prefix="trichip-bench-data-"))
    os.environ.setdefault("TRICHIP_CACHE", str(tmp / "cache"))
    try:
        tables = opts.tables.split(",")
        if "loader" in tables or "prepare" in tables:
            _json_corpus(tmp / "docs", opts.corpus_mb)
        for name, table in (("loader", loader_table), ("prepare", prepare_table), ("quality", quality_table)):
            if name in tables:
                table(report, opts, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if opts.out:
        with open(opts.out, "a") as f:
            f.write("\n" + "\n".join(report.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
