"""python -m launch.convert <verb> ... — move Llama weights between trichip checkpoints and Hugging Face
directories, and check what a checkpoint holds and computes.

  inspect CKPT                  what a checkpoint holds, from its manifest (reads no tensor)
  verify CKPT                   read every tensor; check shape, dtype and digest against the manifest
  from-hf HF_DIR OUT            a LlamaForCausalLM directory -> OUT/0/, a checkpoint at step 0 with fresh
                                optimizer state (train from it: launch.train trainer.init_from=OUT)
  to-hf CKPT HF_DIR             a checkpoint's parameters -> a directory transformers loads
  copy CKPT DST                 a checkpoint -> DST/<step>/, verified on arrival (each a directory or an
                                s3:// / gs:// prefix): moves checkpoints between disks and object stores
  score MODEL --tokens T.npy --out LOGITS.npy
  compare A B [--tokens T.npy]  logits of two models (checkpoints or HF dirs, on one framework or two)

CKPT is a checkpoint directory, or a run or checkpoints directory (its latest checkpoint is used), on
disk or on an object store (s3://bucket/prefix, gs://bucket/prefix: downloaded to a temporary directory);
MODEL, A and B are a CKPT or a Hugging Face directory. Exit codes: 0 done / checks passed, 1 a check
failed (verify, compare, copy), 2 something to fix in the command or a damaged checkpoint (printed as one
line), 3 a checkpoint's files exist but cannot be read (permissions, I/O errors).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from hal import FRAMEWORKS, CheckpointDamaged, HostState, OptimizerSpec, UserError, layout, make_backend
from models import hf
from models.errors import first_line
from models.spec import SIZES, LlamaConfig, num_params, param_shapes
from trainer import checkpoint, tokenizer
from trainer.storage import is_remote

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USER_ERROR = 0, 1, 2
PROG = "python -m launch.convert"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one `error:` line (exit 2) like every other trichip error."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# -- reading models ---------------------------------------------------------------------------------

def _read_manifest(ckpt, name=None) -> dict:
    """A checkpoint's manifest, checked to be what trichip writes (hal.layout.check_manifest)."""
    manifest = checkpoint.read_manifest(ckpt, name)
    layout.check_manifest(manifest, name or ckpt)
    return manifest


def _model_config(manifest: dict, ckpt: Path) -> LlamaConfig:
    try:
        return LlamaConfig.from_dict(manifest["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint {ckpt}: its manifest's model spec is unusable ({first_line(e)})") from None


def _read_tensors(ckpt: Path, manifest: dict, names: list[str], local: Path | None = None) -> dict[str, np.ndarray]:
    """The named tensors of a checkpoint as host arrays (only those are read), each checked against its
    manifest entry (hal.layout.verify). `local`: where its files are, when ckpt is remote (a downloaded copy)."""
    from hal import store
    tensors = store.read_tensors(str((local or ckpt) / "state"), names, name=ckpt)
    layout.verify({n: manifest["tensors"][n] for n in names}, store.summarize(tensors), ckpt)
    return tensors


def read_checkpoint_params(path) -> tuple[LlamaConfig, dict[str, np.ndarray], Path, dict]:
    """(model config, {canonical name: float32}, checkpoint dir, manifest), digests verified; the
    optimizer moments are not read."""
    ckpt = checkpoint.resolve(path)
    manifest = _read_manifest(ckpt)
    cfg = _model_config(manifest, ckpt)
    names = [layout.param_key(n) for n in param_shapes(cfg)]
    missing = [n for n in names if n not in manifest["tensors"]]
    if missing:
        raise CheckpointDamaged(f"checkpoint {ckpt} is damaged: its manifest lacks parameters of its own model "
                                f"spec, e.g. {missing[:2]}")
    with checkpoint.fetch(ckpt) as local:
        tensors = _read_tensors(ckpt, manifest, names, local)
    params = {n: np.asarray(tensors[layout.param_key(n)], np.float32) for n in param_shapes(cfg)}
    return cfg, params, ckpt, manifest


def read_model(path) -> tuple[LlamaConfig, dict[str, np.ndarray], str]:
    """A trichip checkpoint (or run dir) or a Hugging Face directory -> (config, params, description)."""
    if is_remote(path):
        cfg, params, ckpt, manifest = read_checkpoint_params(path)
        return cfg, params, f"{ckpt} (trichip, step {manifest['step']})"
    p = Path(path)
    if hf.is_hf_dir(p):
        cfg, params = hf.read_hf_dir(p)
        return cfg, params, f"{p} (Hugging Face)"
    if not p.exists():
        raise UserError(f"{p} does not exist")
    try:
        ckpt = checkpoint.resolve(p)
    except UserError:
        raise UserError(f"{p} is neither a trichip checkpoint (or run dir) nor a Hugging Face model "
                        f"directory (no {checkpoint.MANIFEST}, no {hf.CONFIG})") from None
    cfg, params, ckpt, manifest = read_checkpoint_params(ckpt)
    return cfg, params, f"{ckpt} (trichip, step {manifest['step']})"


def model_logits(framework: str, cfg: LlamaConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] of `params` on one framework's backend."""
    backend = make_backend({"framework": framework}, cfg, OptimizerSpec())
    backend.set_state(HostState.fresh(params))
    return np.asarray(backend.logits(tokens), np.float32)


def load_tokens(path, cfg: LlamaConfig) -> tuple[np.ndarray, bool]:
    """int32 [B, T] tokens from a .npy file (a [T] file is one sequence); returns (tokens, was_1d)."""
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"--tokens {path}: cannot read it as a .npy array ({e})") from None
    if not isinstance(tokens, np.ndarray):
        raise UserError(f"--tokens {path} is not a single .npy array")
    if tokens.dtype.kind not in "iu" or tokens.ndim not in (1, 2) or tokens.size == 0:
        raise UserError(f"--tokens {path} holds {tokens.dtype} {list(tokens.shape)}; expected integers [B, T] or [T]")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise UserError(f"--tokens {path} has ids in [{tokens.min()}, {tokens.max()}], outside the model's "
                        f"vocabulary [0, {cfg.vocab_size})")
    if tokens.shape[-1] > cfg.max_position_embeddings:
        raise UserError(f"--tokens {path} has sequences of {tokens.shape[-1]} tokens, more than the model's "
                        f"max_position_embeddings ({cfg.max_position_embeddings})")
    return np.atleast_2d(tokens).astype(np.int32), tokens.ndim == 1


def _check_new_file(path: Path) -> None:
    if path.exists():
        raise UserError(f"{path} already exists; choose a new path or remove it")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a directory")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _size_name(cfg: LlamaConfig) -> str | None:
    return next((name for name, c in SIZES.items() if c == cfg), None)


def train_overrides(cfg: LlamaConfig) -> list[str]:
    """launch.train overrides that build this model: a published size by name, else tiny and the differences
    (launch.train's init_from refuses a checkpoint whose model differs from the run's)."""
    name = _size_name(cfg)
    if name:
        return [f"model={name}"]
    base, out = SIZES["tiny"].to_dict(), ["model=tiny"]
    for key, value in cfg.to_dict().items():
        if value == base[key]:
            continue
        if isinstance(value, dict):
            text = "{" + ",".join(f"{k}:{json.dumps(v)}" for k, v in value.items()) + "}"
        else:
            text = json.dumps(value)
        out.append(f"model.{key}={text}")
    return out


# -- verbs ------------------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    ckpt = checkpoint.resolve(args.ckpt)
    m = _read_manifest(ckpt)
    w = m.get("writer", {})
    model = m.get("model", {})
    print(f"checkpoint   {ckpt}")
    print(f"format       version {m['format_version']}")
    print(f"step         {m['step']}")
    try:
        cfg = LlamaConfig.from_dict(model)
        name = _size_name(cfg)
        print(f"model        {name + ', ' if name else ''}{num_params(cfg):,} params, head_dim {cfg.head_dim}")
    except (TypeError, ValueError) as e:
        print(f"model        (unusable spec: {first_line(e)})")
    for k, v in model.items():
        print(f"  {k:<26} {v}")
    versions = ", ".join(f"{k} {v}" for k, v in w.get("versions", {}).items())
    print(f"writer       {w.get('framework')} on {w.get('platform')} ({versions}), precision {w.get('precision')}")
    print(f"  mesh {w.get('mesh')}, {w.get('device_count')} device(s) in {w.get('process_count')} process(es)")
    data = m.get("data") or {}
    print(f"data         path {data.get('path')}, seed {data.get('seed')}, next step {data.get('next_step')}")
    if m.get("source"):
        print(f"source       {m['source'].get('hf_dir', m['source'])}")
    rows, total = [], 0
    for name, t in m.get("tensors", {}).items():
        nbytes = math.prod(t["shape"]) * np.dtype(t["dtype"]).itemsize
        total += nbytes
        rows.append((name, "x".join(map(str, t["shape"])) or "scalar", t["dtype"], _human(nbytes)))
    width = max([len(r[0]) for r in rows] + [4])
    print()
    print(f"{'name':<{width}}  {'shape':<12} {'dtype':<8} {'size':>10}")
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:<12} {r[2]:<8} {r[3]:>10}")
    print(f"total: {len(rows)} tensors, {total:,} bytes ({_human(total)})")
    return EXIT_OK


def check_tensors(local: Path, m: dict, name=None) -> str:
    """Read every tensor of the checkpoint whose files are under `local` and check it against manifest `m`:
    names and shapes against its model spec, then shape, dtype and digest of what is stored (hal.layout.verify).
    Returns a summary; raises CheckpointDamaged naming the first problem, StorageError where files cannot be
    read. `name`: the checkpoint, for messages."""
    from hal import store
    name = name or local
    cfg = _model_config(m, name)
    listed = m["tensors"]
    problem = layout.model_mismatch(listed, layout.state_shapes(param_shapes(cfg)))
    if problem:
        raise CheckpointDamaged(f"checkpoint {name} is damaged: its manifest disagrees with its model spec: {problem}")
    total = 0
    for batch in _batches(listed):    # a bounded amount in memory at once, whatever the model's size
        tensors = store.read_tensors(str(local / "state"), batch, name=name)
        layout.verify({n: listed[n] for n in batch}, store.summarize(tensors), name)
        total += sum(np.asarray(v).nbytes for v in tensors.values())
    return f"{len(listed)} tensors ({_human(total)}) match {checkpoint.MANIFEST} (step {m['step']})"


def _batches(listed: dict, limit: int = 1 << 30) -> list[list[str]]:
    """Tensor names in groups of at most `limit` bytes (a larger tensor alone)."""
    out, size = [[]], 0
    for name, info in listed.items():
        nbytes = math.prod(info["shape"]) * np.dtype(info["dtype"]).itemsize
        if out[-1] and size + nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(name)
        size += nbytes
    return [b for b in out if b]


def cmd_verify(args) -> int:
    ckpt = checkpoint.resolve(args.ckpt)
    try:
        _read_manifest(ckpt)
        with checkpoint.fetch(ckpt) as local:
            summary = check_tensors(local, _read_manifest(local, ckpt), ckpt)
    except CheckpointDamaged as e:
        print(f"FAIL: {e}")
        return EXIT_CHECK_FAILED
    print(f"OK: {ckpt}: {summary}")
    return EXIT_OK


def cmd_copy(args) -> int:
    """SRC's checkpoint -> DST/<step>/, checked on arrival (every tensor read back from the copy and its digest
    compared with the manifest) before it becomes visible: on disk it is renamed into place from
    DST/.tmp-<step>/, on a store its manifest is uploaded last; a copy that fails the check is removed."""
    src = checkpoint.resolve(args.src)
    step = _read_manifest(src)["step"]
    root = checkpoint.public(checkpoint.location(args.dst))
    dest = root / str(step)
    if checkpoint.is_checkpoint(root):
        raise UserError(f"{root} is itself a checkpoint; give the checkpoints directory to copy into "
                        f"(the copy becomes DST/{step})")
    if checkpoint.is_checkpoint(dest) or (not is_remote(dest) and dest.exists()):
        raise UserError(f"{dest} already exists; remove it or copy into another directory")
    if not is_remote(root) and root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file; give a directory to copy into")
    made_root = not is_remote(root) and not root.exists()
    wrote = False
    try:
        with checkpoint.fetch(src) as local_src, tempfile.TemporaryDirectory(prefix="trichip-copy-") as tmp:
            manifest = _read_manifest(local_src, src)
            if is_remote(dest):
                wrote = True
                checkpoint.upload(local_src, dest, commit=False)      # invisible until its manifest is there
                arrived = Path(tmp) / "arrived"
                checkpoint.download(dest, arrived, require_manifest=False)
                shutil.copy2(local_src / checkpoint.MANIFEST, arrived / checkpoint.MANIFEST)
            else:
                root.mkdir(parents=True, exist_ok=True)
                arrived = root / f".tmp-{step}"
                shutil.rmtree(arrived, ignore_errors=True)
                wrote = True
                shutil.copytree(local_src, arrived)
            problem = None
            try:
                summary = check_tensors(arrived, _read_manifest(arrived, dest), dest)
            except CheckpointDamaged as e:
                problem = str(e)
            if problem is None:
                if is_remote(dest):
                    checkpoint.commit(local_src, dest)
                    if checkpoint.read_manifest(dest) != manifest:
                        problem = f"{dest}: {checkpoint.MANIFEST} differs from the source's after the upload"
                else:
                    os.rename(arrived, dest)
        if problem is not None:
            _remove_copy(dest, root, made_root)
            print(f"FAIL: {problem}; the copy was removed")
            return EXIT_CHECK_FAILED
    except BaseException as e:
        if wrote:
            _remove_copy(dest, root, made_root)
        if isinstance(e, OSError):        # a transfer failed (network, disk): one line, like every error here
            raise UserError(f"copy of {src} to {dest} failed ({getattr(e, 'strerror', None) or e}); "
                            f"nothing was left at {dest}") from None
        raise
    print(f"copied {src} to {dest}: {summary}")
    return EXIT_OK


def _remove_copy(dest, root, made_root: bool) -> None:
    """Remove a failed copy (and, on disk, its temp dir and the DST directory if copy made it)."""
    with contextlib.suppress(Exception):
        checkpoint.remove(dest)
    if not is_remote(dest):
        shutil.rmtree(root / f".tmp-{dest.name}", ignore_errors=True)
        if made_root:
            with contextlib.suppress(OSError):
                root.rmdir()


def cmd_from_hf(args) -> int:
    out = hf.check_target(args.out)
    _, raw = hf.read_hf_config(args.hf_dir)
    cfg, params = hf.read_hf_dir(args.hf_dir)
    backend = make_backend({"framework": args.hal}, cfg, OptimizerSpec())
    backend.set_state(HostState.fresh(params))
    meta = {"model": cfg.to_dict(), "writer": backend.describe(),
            "data": {"path": None, "seed": 0, "next_step": 0}, "rng": {"seed": 0},
            "source": {"hf_dir": str(Path(args.hf_dir).resolve()), "hf_config": raw}}
    tmp = hf.atomic_dir(out)
    try:
        checkpoint.save(tmp, 0, backend, meta, "")
        hf.commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    command = ["python", "-m", "launch.train", f"trainer.init_from={out}", *train_overrides(cfg)]
    print(f"wrote {out / '0'}: {num_params(cfg):,} params from {args.hf_dir}, step 0, fresh optimizer state")
    print(f"train from it: {shlex.join(command)}")
    return EXIT_OK


def cmd_to_hf(args) -> int:
    target = hf.check_target(args.hf_dir)
    max_shard = hf.parse_size(args.max_shard_size)
    cfg, params, ckpt, manifest = read_checkpoint_params(args.ckpt)
    source = dict((manifest.get("source") or {}).get("hf_config") or {})
    tok = _checkpoint_tokenizer(ckpt, manifest, args.tokenizer)
    if tok is not None:
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
        source.setdefault("eos_token_id", tok.eos_id)
    files = hf.write_hf_dir(target, cfg, params, dtype=args.dtype, max_shard_bytes=max_shard, extra_config=source)
    if tok is not None:
        tokenizer.export(tok, target)
    size = sum((target / f).stat().st_size for f in files)
    note = "with its tokenizer" if tok is not None else \
        "without a tokenizer (the run's tokenizer.json was not found beside the checkpoints: pass --tokenizer)"
    print(f"wrote {target}: {len(params)} tensors as {args.dtype} in {len(files)} file(s), {_human(size)}, "
          f"from {ckpt} (step {manifest['step']}), {note}")
    return EXIT_OK


def _checkpoint_tokenizer(ckpt, manifest: dict, given: str | None):
    """The tokenizer to export: --tokenizer (checked against the one the checkpoint records), else the
    run's (run_dir/tokenizer.json beside run_dir/checkpoints/), else None."""
    recorded = (manifest.get("data") or {}).get("tokenizer")
    if given:
        recorded_eos = (recorded or {}).get("eos_id") if tokenizer.parse_spec(given)[0] == "file" else None
        tok = tokenizer.HFTokenizer(given, eos_id=recorded_eos) if recorded_eos is not None else tokenizer.load(given)
        if recorded and recorded.get("sha256") not in (None, tok.sha256):
            raise UserError(f"--tokenizer {given} is not the tokenizer {ckpt} was trained with "
                            f"({recorded.get('kind')}, {str(recorded.get('sha256'))[:12]})")
        return tok
    run_dir = None
    if not is_remote(ckpt) and Path(ckpt).parent.name == "checkpoints":
        run_dir = Path(ckpt).parent.parent
    return tokenizer.for_checkpoint(recorded, run_dir)


def cmd_score(args) -> int:
    out = Path(args.out)
    _check_new_file(out)
    cfg, params, desc = read_model(args.model)
    tokens, one_d = load_tokens(args.tokens, cfg)
    logits = model_logits(args.hal, cfg, params, tokens)
    if one_d:
        logits = logits[0]
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, logits)
        os.rename(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"wrote {out}: logits {list(logits.shape)} float32 of {desc} on {args.hal}")
    return EXIT_OK


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare_logits(a: np.ndarray, b: np.ndarray) -> dict:
    """max |a - b| and KL(softmax a || softmax b) per token (mean, max), in float64."""
    la, lb = _log_softmax(a), _log_softmax(b)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return {"max_abs": float(np.abs(a.astype(np.float64) - b).max()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def cmd_compare(args) -> int:
    hal_b = args.hal_b or args.hal
    cfg_a, params_a, desc_a = read_model(args.a)
    cfg_b, params_b, desc_b = read_model(args.b)
    if cfg_a.vocab_size != cfg_b.vocab_size:
        raise UserError(f"A has a vocabulary of {cfg_a.vocab_size} and B of {cfg_b.vocab_size}: "
                        f"their logits cannot be compared")
    if args.tokens:
        tokens, _ = load_tokens(args.tokens, cfg_a)
        load_tokens(args.tokens, cfg_b)
        origin = args.tokens
    else:
        seq = min(args.seq_len, cfg_a.max_position_embeddings, cfg_b.max_position_embeddings)
        tokens = np.random.default_rng(args.seed).integers(0, cfg_a.vocab_size, (args.batch, seq)).astype(np.int32)
        origin = f"random, seed {args.seed}"
    la = model_logits(args.hal, cfg_a, params_a, tokens)
    lb = model_logits(hal_b, cfg_b, params_b, tokens)
    r = compare_logits(la, lb)
    print(f"A: {desc_a} on {args.hal}")
    print(f"B: {desc_b} on {hal_b}")
    print(f"tokens: {tokens.shape[0]} x {tokens.shape[1]} ({origin})")
    print(f"max abs logit diff: {r['max_abs']:.3g} (--atol {args.atol:g})")
    print(f"KL(A||B) per token: mean {r['kl_mean']:.3g}, max {r['kl_max']:.3g} (--max-kl {args.max_kl:g})")
    failed = []
    if not r["max_abs"] <= args.atol:
        failed.append(f"max abs logit diff {r['max_abs']:.3g} > --atol {args.atol:g}")
    if not r["kl_max"] <= args.max_kl:
        failed.append(f"max KL {r['kl_max']:.3g} > --max-kl {args.max_kl:g}")
    if failed:
        print("FAIL: " + "; ".join(failed))
        return EXIT_CHECK_FAILED
    print("OK: logits agree within --atol and --max-kl")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("inspect", help="what a checkpoint holds, from its manifest (reads no tensor)")
    s.add_argument("ckpt", help="checkpoint dir, or a run / checkpoints dir (latest checkpoint)")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("verify", help="read every tensor and check it against the manifest (exit 1 if not)")
    s.add_argument("ckpt", help="checkpoint dir, or a run / checkpoints dir (latest checkpoint)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("from-hf", help="HF LlamaForCausalLM dir -> OUT/0/, a trichip checkpoint at step 0")
    s.add_argument("hf_dir", help="a save_pretrained directory (config.json + safetensors)")
    s.add_argument("out", help="new checkpoints directory; the checkpoint is OUT/0 (use trainer.init_from=OUT)")
    s.add_argument("--hal", choices=FRAMEWORKS, default="jax", help="framework that writes it (default jax)")
    s.set_defaults(func=cmd_from_hf)

    s = sub.add_parser("to-hf", help="a checkpoint's parameters -> a directory transformers loads")
    s.add_argument("ckpt", help="checkpoint dir, or a run / checkpoints dir (latest checkpoint)")
    s.add_argument("hf_dir", help="new directory to write")
    s.add_argument("--dtype", choices=hf.DTYPES, default="float32",
                   help="float32 (default, exact) or bfloat16 (rounded to nearest even)")
    s.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    s.add_argument("--tokenizer", default=None, help="tokenizer to export beside the weights: bytes or a "
                   "tokenizer.json (default: the run's, found beside its checkpoints)")
    s.set_defaults(func=cmd_to_hf)

    s = sub.add_parser("copy", help="a checkpoint -> DST/<step>/ on disk or an object store, verified on arrival")
    s.add_argument("src", help="checkpoint dir, or a run / checkpoints dir (latest checkpoint); or s3://, gs://")
    s.add_argument("dst", help="checkpoints directory or s3:// / gs:// prefix to copy into (as DST/<step>)")
    s.set_defaults(func=cmd_copy)

    s = sub.add_parser("score", help="logits of a model for a token file")
    s.add_argument("model", help="checkpoint (or run dir) or HF directory")
    s.add_argument("--hal", choices=FRAMEWORKS, default="jax")
    s.add_argument("--tokens", required=True, help=".npy integer array [B, T] or [T]")
    s.add_argument("--out", required=True, help="new .npy file for float32 logits [B, T, V] ([T, V] for [T] tokens)")
    s.set_defaults(func=cmd_score)

    s = sub.add_parser("compare", help="logits of two models on the same tokens: exit 0 if they agree, else 1")
    s.add_argument("a", help="checkpoint (or run dir) or HF directory")
    s.add_argument("b", help="checkpoint (or run dir) or HF directory")
    s.add_argument("--hal", choices=FRAMEWORKS, default="jax", help="framework for A (and B unless --hal-b)")
    s.add_argument("--hal-b", choices=FRAMEWORKS, default=None, help="framework for B (default: --hal)")
    s.add_argument("--tokens", help=".npy integer array [B, T] or [T]; default: random tokens from --seed")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=2, help="random batch size without --tokens (default 2)")
    s.add_argument("--seq-len", type=int, default=64, help="random sequence length without --tokens (default 64)")
    s.add_argument("--atol", type=float, default=1e-4, help="bound on max |logit A - logit B| (default 1e-4)")
    s.add_argument("--max-kl", type=float, default=1e-6, help="bound on max per-token KL(A||B) (default 1e-6)")
    s.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if getattr(args, "batch", 1) < 1 or getattr(args, "seq_len", 1) < 1:
        print("error: --batch and --seq-len must be positive", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
