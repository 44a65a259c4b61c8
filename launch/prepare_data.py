"""python -m launch.prepare_data OUT.npy TEXT_FILE_OR_DIR... — byte-tokenize text into a token file.

Each file is one document (documents are separated by the end-of-document token). Directories are
walked for *.txt, *.md and *.rst files. Train with: python -m launch.train data=tokens data.path=OUT.npy
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hal import UserError
from trainer.data import write_token_file

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.prepare_data", description=__doc__.splitlines()[0])
    p.add_argument("out", help="token file to write (.npy); OUT.json gets the metadata")
    p.add_argument("inputs", nargs="+", help="text files or directories")
    args = p.parse_args(argv)
    files = []
    for item in map(Path, args.inputs):
        if item.is_dir():
            files += sorted(f for f in item.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
        elif item.is_file():
            files.append(item)
        else:
            print(f"error: {item} does not exist", file=sys.stderr)
            return 2
    try:
        out = write_token_file(args.out, (f.read_bytes() for f in files), source=", ".join(args.inputs))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {len(files)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
