"""python -m launch.prepare_data OUT_DIR INPUT... — tokenize text into a sharded token dataset.

Inputs are text files (one document each), JSONL (a document per line, in --field), Parquet (a document
per row, in --column), any of them gzipped, and directories holding them. OUT_DIR receives token shards,
the tokenizer (tokenizer.json) and dataset.json, the index. Rerunning the same command after a crash
finishes the dataset. Train with: python -m launch.train data=tokens data.path=OUT_DIR
"""
from __future__ import annotations

import argparse
import os
import sys

from hal import UserError
from trainer.prepare import Options, build


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.prepare_data", description=__doc__.splitlines()[0])
    p.add_argument("out", help="dataset directory to write (or to finish)")
    p.add_argument("inputs", nargs="+", help="text, .jsonl, .parquet files (optionally .gz) or directories")
    p.add_argument("--tokenizer", default="bytes",
                   help="bytes (default), a tokenizer.json file or directory holding one, or train-bpe:N")
    p.add_argument("--eos-token", default=None, help="the tokenizer's end-of-document token, when it is not one "
                   "of <|end_of_text|>, <|endoftext|>, </s>, <eos>")
    p.add_argument("--field", default="text", help="JSONL field holding the document (default: text)")
    p.add_argument("--column", default="text", help="Parquet column holding the document (default: text)")
    p.add_argument("--on-missing", default="error", choices=("error", "skip"),
                   help="a JSONL line or Parquet row without the document: stop (default) or skip and count it")
    p.add_argument("--shard-tokens", type=int, default=1 << 27, help="tokens per shard (about; default 2**27)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizer processes (default: one per core; 1 tokenizes in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    opts = Options(tokenizer=args.tokenizer, eos_token=args.eos_token, field=args.field, column=args.column,
                   on_missing=args.on_missing, shard_tokens=args.shard_tokens, workers=args.workers,
                   progress=not args.no_progress, inputs=args.inputs)
    try:
        index = build(args.out, opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = f", {len(index['skipped'])} document(s) skipped for a missing field" if index["skipped"] else ""
    print(f"{args.out}: {index['tokens']} tokens, {index['documents']} documents in {len(index['shards'])} "
          f"shard(s), tokenizer {index['tokenizer']['kind']} (vocab {index['tokenizer']['vocab_size']}){skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
