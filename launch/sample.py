"""python -m launch.sample CKPT --hal jax|torch --prompt "..." --max-new-tokens N — text from any checkpoint.

CKPT is a checkpoint directory, a run or checkpoints directory (its latest checkpoint), on disk or on an
object store (s3://, gs://), or a Hugging Face directory. Decoding uses a KV cache on either framework:
greedy at --temperature 0 (the default), else drawn from the --top-k most likely tokens, reproducibly for a
--seed on each framework. The prompt is encoded with the run's tokenizer (the byte tokenizer when the
checkpoint records it, the run dir's tokenizer.json otherwise, or --tokenizer); an empty prompt starts a
document (the end-of-document token). Each sample is printed as text, or as one JSON line with --json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from hal import FRAMEWORKS, UserError
from launch import convert
from models import hf
from trainer import tokenizer as tk
from trainer.storage import is_remote

PROG = "python -m launch.sample"


def load_model(path: str, given_tokenizer: str | None):
    """(config, params, description, tokenizer or None) of a checkpoint or a Hugging Face directory."""
    if not is_remote(path) and hf.is_hf_dir(Path(path)):
        cfg, params, desc = convert.read_model(path)
        local = Path(path) / tk.TOKENIZER_FILE
        tok = tk.load(given_tokenizer) if given_tokenizer else tk.load(str(local)) if local.is_file() else None
        return cfg, params, desc, tok
    cfg, params, ckpt, manifest = convert.read_checkpoint_params(path)
    tok = convert._checkpoint_tokenizer(ckpt, manifest, given_tokenizer)
    return cfg, params, f"{ckpt} (trichip, step {manifest['step']})", tok


def prompt_ids(args, tok) -> np.ndarray:
    """int32 [num_samples, P]: --prompt-ids as given, else --prompt encoded ("" = end-of-document)."""
    if args.prompt_ids is not None:
        try:
            ids = [int(i) for i in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise UserError(f"--prompt-ids {args.prompt_ids!r}: give token ids separated by commas") from None
    elif tok is None:
        raise UserError("no tokenizer was found for this checkpoint (the run's tokenizer.json is not beside its "
                        "checkpoints): pass --tokenizer bytes|TOKENIZER.json, or --prompt-ids")
    else:
        ids = tok.encode_batch([args.prompt])[0].tolist() if args.prompt else [tok.eos_id]
    return np.tile(np.asarray(ids, np.int32)[None], (args.num_samples, 1))


def build_parser() -> argparse.ArgumentParser:
    p = convert._Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="checkpoint, run or checkpoints dir (local, s3://, gs://), or a Hugging Face dir")
    p.add_argument("--hal", choices=FRAMEWORKS, default="jax", help="framework that decodes (default jax)")
    p.add_argument("--prompt", default="", help="text to continue (default: the start of a document)")
    p.add_argument("--prompt-ids", default=None, help="token ids to continue instead of --prompt, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument("--top-k", type=int, default=0, help="draw from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples of the same prompt (one batch)")
    p.add_argument("--tokenizer", default=None, help="bytes or a tokenizer.json (default: the run's)")
    p.add_argument("--json", action="store_true", help="one JSON line per sample: prompt_ids, ids, text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.hal == "torch":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")   # JAX only reads the checkpoint: keep it off the GPU
    try:
        if args.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
        cfg, params, desc, tok = load_model(args.ckpt, args.tokenizer)
        prompt = prompt_ids(args, tok)
        from hal.generate import generate
        out = generate(args.hal, cfg, params, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"# {desc} on {args.hal}", file=sys.stderr)
    for row in out:
        ids = row.tolist()
        text = tok.decode(prompt[0].tolist() + ids) if tok is not None else None
        if args.json:
            print(json.dumps({"prompt_ids": prompt[0].tolist(), "ids": ids, "text": text}))
        else:
            print(text if text is not None else " ".join(map(str, ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
