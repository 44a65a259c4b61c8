"""The training loop: the same on every backend.

    state   <- resume from run_dir/checkpoints, or trainer.init_from, or the reference init (seed)
    for step in [state.step, trainer.steps):
        tokens <- data.train_batch(step)            a pure function of (seed, step)
        lr     <- schedule(step)                    a pure function of the updates done
        backend.train_step(tokens, lr)              one compiled step, one optimizer update
        metrics.jsonl, log line, eval, checkpoint   by policy
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from hal import (FRAMEWORKS, CheckpointSaveError, HostState, NonFiniteError, OptimizerSpec, UserError,
                 make_backend)
from models.spec import LlamaConfig, flops_per_token, num_params, reference_init
from models import hf
from trainer import checkpoint
from trainer.data import TokenData
from trainer.observe import Scalars, peak_flops
from trainer.safety import RunLock, StopRequest
from trainer.schedule import learning_rate

log = logging.getLogger("trichip")
RUN_MARKER = "run.json"
STAGING, REMOTE_CACHE = ".staging", ".remote-cache"     # run-dir scratch for checkpoints on object stores


def _positive_int(cfg: dict, section: str, key: str, allow_zero: bool = False) -> int:
    value = cfg[section].get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        kind = "a non-negative" if allow_zero else "a positive"
        raise UserError(f"{section}.{key} must be {kind} integer, got {value!r}")
    return value


def _number(cfg: dict, section: str, key: str, lo: float, hi: float) -> float:
    value = cfg[section].get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise UserError(f"{section}.{key} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class Run:
    """A validated run configuration (plain dict from Hydra) with everything derived from it."""

    def __init__(self, cfg: dict, run_dir: str | os.PathLike):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        for section in ("hal", "model", "data", "optim", "trainer"):
            if not isinstance(cfg.get(section), dict):
                raise UserError(f"config section {section!r} is missing")
        if cfg["hal"].get("framework") not in FRAMEWORKS:
            raise UserError(f"unknown hal framework {cfg['hal'].get('framework')!r}: use hal=jax or hal=torch")
        try:
            self.model = LlamaConfig.from_dict(cfg["model"])
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None
        t = cfg["trainer"]
        self.steps = _positive_int(cfg, "trainer", "steps", allow_zero=True)
        self.global_batch = _positive_int(cfg, "trainer", "global_batch")
        self.micro_batch = t.get("micro_batch") or self.global_batch
        _positive_int({"trainer": {"micro_batch": self.micro_batch}}, "trainer", "micro_batch")
        if self.global_batch % self.micro_batch:
            raise UserError(f"trainer.global_batch ({self.global_batch}) must be a multiple of "
                            f"trainer.micro_batch ({self.micro_batch})")
        self.accum = self.global_batch // self.micro_batch
        self.seq_len = _positive_int(cfg, "trainer", "seq_len")
        if self.seq_len > self.model.max_position_embeddings:
            raise UserError(f"trainer.seq_len ({self.seq_len}) exceeds model.max_position_embeddings "
                            f"({self.model.max_position_embeddings})")
        self.log_every = _positive_int(cfg, "trainer", "log_every")
        self.eval_every = _positive_int(cfg, "trainer", "eval_every", allow_zero=True)
        self.eval_batches = _positive_int(cfg, "trainer", "eval_batches")
        self.checkpoint_every = _positive_int(cfg, "trainer", "checkpoint_every", allow_zero=True)
        self.keep = _positive_int(cfg, "trainer", "keep_checkpoints")
        if t.get("precision") not in ("fp32", "bf16"):
            raise UserError(f"trainer.precision must be fp32 or bf16, got {t.get('precision')!r}")
        o = cfg["optim"]
        self.peak_lr = _number(cfg, "optim", "lr", 0.0, 3.0e38)
        self.warmup = _positive_int(cfg, "optim", "warmup_steps", allow_zero=True)
        self.min_lr_ratio = _number(cfg, "optim", "min_lr_ratio", 0.0, 1.0)
        if o.get("schedule") not in ("cosine", "linear", "constant"):
            raise UserError(f"optim.schedule must be cosine, linear or constant, got {o.get('schedule')!r}")
        self.optim = OptimizerSpec(b1=_number(cfg, "optim", "b1", 0.0, 1.0), b2=_number(cfg, "optim", "b2", 0.0, 1.0),
                                   eps=_number(cfg, "optim", "eps", 0.0, 1.0),
                                   weight_decay=_number(cfg, "optim", "weight_decay", 0.0, 10.0),
                                   max_grad_norm=_number(cfg, "optim", "max_grad_norm", 1e-12, 1e12))
        for key, allowed in (("on_nonfinite", ("stop", "skip")), ("on_save_error", ("stop", "continue"))):
            if t.get(key, allowed[0]) not in allowed:
                raise UserError(f"trainer.{key} must be one of {', '.join(allowed)}, got {t.get(key)!r}")
        if not (isinstance(t.get("async_save", "auto"), bool) or t.get("async_save", "auto") == "auto"):
            raise UserError(f"trainer.async_save must be auto, true or false, got {t.get('async_save')!r}")
        self.async_save = t.get("async_save", "auto")     # auto: the backend's async_save_default
        self.seed = cfg.get("seed", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.check_run_dir()
        self._ckpt_root = checkpoint.checkpoint_root(t.get("checkpoint_dir"), self.run_dir)
        self.init_from = t.get("init_from")
        self.init_hf = bool(self.init_from) and "://" not in str(self.init_from) and hf.is_hf_dir(self.init_from)
        if self.init_from and not self.init_hf:
            self.init_ckpt = checkpoint.resolve(self.init_from)

    def lr(self, count: int) -> float:
        return learning_rate(count, peak_lr=self.peak_lr, warmup_steps=self.warmup, total_steps=self.steps,
                             min_lr_ratio=self.min_lr_ratio, schedule=self.cfg["optim"]["schedule"])

    @property
    def ckpt_root(self):
        """run_dir/checkpoints, or trainer.checkpoint_dir: a directory or an s3:// / gs:// prefix (a RemotePath)."""
        return self._ckpt_root

    def check_run_dir(self) -> None:
        """A run dir is new, or one trichip made (it has run.json). Hydra's own files don't count."""
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise UserError(f"run dir {d} is a file; choose a directory (run_dir=...)")
        if not d.is_dir() or (d / RUN_MARKER).is_file():
            return
        foreign = [p.name for p in d.iterdir() if p.name not in (".hydra", STAGING, REMOTE_CACHE)
                   and not p.name.endswith(".log")]
        if foreign:
            raise UserError(f"run dir {d} is not a trichip run (no {RUN_MARKER}, holds {sorted(foreign)[:3]}); "
                            f"choose a new directory with run_dir=...")

    def check_model(self, ckpt: Path, manifest: dict) -> None:
        theirs = manifest.get("model", {})
        ours = self.model.to_dict()
        diff = [f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
        if diff:
            raise UserError(f"checkpoint {ckpt} was written for another model ({'; '.join(diff[:3])}); "
                            f"use the model config it was trained with, or a new run")


def _metrics_upto(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint we resume from): no step twice."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass            # a line cut short by a crash mid-write
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _progress(total: int, initial: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _redirect_logging(bar):
    """With a progress bar on the terminal, route console log lines through it so they don't tear it."""
    if bar is None:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm(loggers=[logging.getLogger()])


def train(cfg: dict, run_dir: str | os.PathLike, config_yaml: str = "") -> dict:
    """Run (or resume) training; returns a summary. Raises UserError for anything the user must change."""
    run = Run(cfg, run_dir)
    data = TokenData(cfg["data"]["path"], run.seq_len, run.seed, run.model.vocab_size,
                     cfg["data"].get("eval_fraction", 0.05))
    t = cfg["trainer"]
    # Check the starting checkpoint before building the backend: a wrong model fails before any compute.
    candidates = checkpoint.list_steps(run.ckpt_root)[::-1] if t.get("resume", True) else []
    if candidates:
        newest = _manifest_or_none(run.ckpt_root / str(candidates[0]))
        if newest is not None:      # unreadable: the resume below falls back past it
            run.check_model(run.ckpt_root / str(candidates[0]), newest)
    elif run.init_hf:       # fine-tuning from a Hugging Face directory: its config must be the run's model
        run.check_model(run.init_from, {"model": hf.read_hf_config(run.init_from)[0].to_dict()})
    elif run.init_from:
        run.check_model(run.init_ckpt, checkpoint.read_manifest(run.init_ckpt))

    backend = make_backend(cfg["hal"], run.model, run.optim, t["precision"], bool(t.get("remat", False)))
    backend.check_batch(run.micro_batch)
    lead = backend.process_index == 0
    if not lead:
        log.setLevel(logging.WARNING)     # one process reports; all of them train
    lock = RunLock(run.run_dir).acquire() if lead and not t.get("precompile", False) else None
    try:
        return _train(cfg, run, data, backend, candidates, config_yaml)
    finally:
        if lock:
            lock.release()


def _manifest_or_none(ckpt: Path) -> dict | None:
    try:
        return checkpoint.read_manifest(ckpt)
    except UserError:
        return None        # damaged: the resume below falls back to an older checkpoint


def _restore(run: Run, backend, candidates: list[int], strict: bool) -> tuple[int, str]:
    """Load the newest good checkpoint of the run dir; warn and fall back past damaged ones."""
    for step in candidates:
        ckpt = run.ckpt_root / str(step)
        try:
            manifest = checkpoint.load(ckpt, backend, cache=run.run_dir / REMOTE_CACHE)
            run.check_model(ckpt, manifest)
            return manifest["step"], _describe_source(ckpt, manifest)
        except UserError as e:
            if strict or "another model" in str(e):   # a wrong model is the user's to fix, not damage
                raise
            log.warning("%s — falling back to the previous checkpoint", e)
        except Exception as e:   # unreadable tensors: truncated, missing or corrupt files
            if strict:
                raise UserError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
            log.warning("checkpoint %s cannot be read (%s) — falling back to the previous checkpoint",
                        ckpt, type(e).__name__)
    return -1, ""


def _describe_source(ckpt: Path, manifest: dict) -> str:
    w = manifest["writer"]
    return f"{ckpt} (step {manifest['step']}, written by {w['framework']} on {w['platform']}, mesh {w.get('mesh')})"


def _train(cfg: dict, run: Run, data: TokenData, backend, candidates: list[int], config_yaml: str) -> dict:
    t = cfg["trainer"]
    lead = backend.process_index == 0
    info = backend.describe()
    start_step, source = -1, "reference init"
    if candidates:
        start_step, source = _restore(run, backend, candidates, bool(t.get("strict_resume", False)))
        if start_step < 0:
            log.warning("no readable checkpoint in %s: starting from the reference init", run.ckpt_root)
    elif run.init_hf:       # weights only: fresh optimizer state, step 0
        backend.set_state(HostState.fresh(hf.read_hf_dir(run.init_from)[1]))
        start_step, source = 0, f"Hugging Face directory {run.init_from} (weights only)"
    elif run.init_from:
        manifest = checkpoint.load(run.init_ckpt, backend, cache=run.run_dir / REMOTE_CACHE)
        start_step, source = manifest["step"], _describe_source(run.init_ckpt, manifest)
        if t.get("init_weights_only", False):
            start_step = 0
            backend.set_state(HostState.fresh(backend.get_state().params))
    if start_step < 0:
        start_step = 0
        backend.set_state(HostState.fresh(reference_init(run.model, run.seed)))

    if t.get("precompile", False):
        return _precompile(backend, data, run, start_step)

    metrics_path = run.run_dir / "metrics.jsonl"
    if lead:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        marker = run.run_dir / RUN_MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "model": run.model.to_dict(), "first_writer": info}, indent=1))
        _metrics_upto(metrics_path, start_step)
    tokens_per_step = run.global_batch * run.seq_len
    log.info("%s on %s: %d device(s) in %d process(es), mesh %s (%s)", info["framework"], info["platform"],
             info["device_count"], info["process_count"], info.get("mesh", {}), info.get("mesh_source", "-"))
    log.info("%s params, %d steps of %d tokens; start at step %d from %s",
             f"{num_params(run.model):,}", run.steps, tokens_per_step, start_step, source)
    log.info("unigram baseline of the data: %.4f nats/token", data.unigram_entropy())

    meta = {"model": run.model.to_dict(), "writer": info,
            "data": {"path": cfg["data"]["path"], "seed": run.seed, "next_step": None},
            "rng": {"seed": run.seed}}
    on_nonfinite, on_save_error = t.get("on_nonfinite", "stop"), t.get("on_save_error", "stop")

    pending: checkpoint.PendingSave | None = None
    async_save = backend.async_save_default if run.async_save == "auto" else run.async_save

    def failed(step: int, e: Exception) -> None:
        if lead:
            checkpoint.prune(run.ckpt_root, run.keep)   # removes the half-written temp dir
        good = checkpoint.list_steps(run.ckpt_root, best_effort=True)
        reason = _io_reason(e)
        msg = (f"checkpoint at step {step} failed ({reason}); earlier checkpoints are intact "
               f"(latest: {good[-1] if good else 'none'})")
        if on_save_error == "continue":
            log.error("%s; training goes on (trainer.on_save_error=continue)", msg)
            return
        raise CheckpointSaveError(msg + "; free space or set trainer.on_save_error=continue") from None

    def commit() -> None:
        """Finish the pending save (every process at the same step): manifest, rename, prune."""
        nonlocal pending
        p, pending = pending, None
        try:
            path = p.finish()
        except (OSError, ValueError, RuntimeError) as e:   # orbax/tensorstore report I/O errors as ValueError
            return failed(p.step, e)
        if lead:
            checkpoint.prune(run.ckpt_root, run.keep)
        log.info("checkpoint %s", path)

    def save(done: int, wait: bool = False) -> None:
        nonlocal pending
        if pending is not None:
            commit()
        try:
            pending = checkpoint.PendingSave(run.ckpt_root, done, backend,
                                             dict(meta, data=dict(meta["data"], next_step=done)), config_yaml,
                                             staging=run.run_dir / STAGING, background=async_save and not wait)
        except (OSError, ValueError, RuntimeError) as e:
            return failed(done, e)
        if wait or not async_save:
            commit()

    bar = _progress(run.steps, start_step) if lead else None
    scalars = Scalars(run.run_dir, enabled=lead and t.get("tensorboard", True))
    peak = peak_flops(info.get("device_kind", ""), t["precision"], t.get("peak_tflops"))
    model_flops_per_token = flops_per_token(run.model, run.seq_len)
    last, saved_at, preempted = {}, start_step, ""
    with (open(metrics_path, "a") if lead else open(os.devnull, "w")) as metrics_file, \
            _redirect_logging(bar), StopRequest() as stop, _keep_pending(lambda: pending, backend):
        for step in range(start_step, run.steps):
            t0 = time.perf_counter()
            tokens = data.train_batch(step, run.global_batch).reshape(run.accum, run.micro_batch, run.seq_len + 1)
            lr = run.lr(step)
            m = backend.train_step(tokens, lr)
            dt = time.perf_counter() - t0
            done = step + 1
            last = {"step": done, "loss": m.loss, "lr": lr, "grad_norm": m.grad_norm,
                    "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
            if peak:
                last["mfu"] = model_flops_per_token * last["tokens_per_s"] / (peak * info["device_count"])
            if m.skipped:
                last["skipped"] = True
            if run.eval_every and (done % run.eval_every == 0 or done == run.steps):
                last["eval_loss"] = evaluate(backend, data, run)
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            scalars.add(done, last)
            if m.skipped:
                if on_nonfinite == "stop":
                    if pending is not None:      # a good step's checkpoint still being written: keep it
                        commit()
                    raise NonFiniteError(f"non-finite loss ({m.loss}) or gradient norm ({m.grad_norm}) at step "
                                         f"{done}; the update was not applied and the last good checkpoint is kept "
                                         f"(set trainer.on_nonfinite=skip to skip such steps)")
                log.warning("step %d: non-finite loss (%s) or gradient norm (%s): update skipped", done, m.loss,
                            m.grad_norm)
            if done % run.log_every == 0 or done == run.steps or "eval_loss" in last:
                line = (f"step {done}/{run.steps} | loss {m.loss:.4f} | lr {lr:.3g} | grad_norm {m.grad_norm:.3f}"
                        f" | {last['tokens_per_s']:,.0f} tok/s")
                if "mfu" in last:
                    line += f" | MFU {100 * last['mfu']:.1f}%"
                if "eval_loss" in last:
                    line += f" | eval_loss {last['eval_loss']:.4f}"
                log.info(line)
            if bar:
                extra = {"mfu": f"{100 * last['mfu']:.1f}%"} if "mfu" in last else {}
                bar.set_postfix(loss=f"{m.loss:.4f}", tok_s=f"{last['tokens_per_s']:,.0f}", **extra, refresh=False)
                bar.update(1)
            if (run.checkpoint_every and done % run.checkpoint_every == 0) or done == run.steps:
                save(done, wait=done == run.steps)
                saved_at = done
            stop_now, written = _agree_step(backend, stop.signum is not None, pending is None or pending.done())
            if pending is not None and written:
                commit()
            if stop_now:
                if saved_at != done:
                    save(done, wait=True)
                elif pending is not None:
                    commit()
                preempted = stop.name or "a signal on another process"
                log.info("stopped by %s at step %d: checkpoint written; run the same command to resume",
                         preempted, done)
                break
        if pending is not None:
            commit()
    if bar:
        bar.close()
    scalars.close()
    compilations = backend.compilations()
    if compilations:
        log.info("compilations: %s", compilations)
    return {"run_dir": str(run.run_dir), "start_step": start_step, "last": last, "compilations": compilations,
            "preempted": preempted}


def _io_reason(e: Exception) -> str:
    """The OS error behind a failed write, also when tensorstore reports it inside a ValueError."""
    if getattr(e, "strerror", None):
        return e.strerror
    code = re.search(r"os_error_code='(\d+)'", str(e))
    return os.strerror(int(code.group(1))) if code else (str(e).splitlines()[0][:160] if str(e) else type(e).__name__)


@contextlib.contextmanager
def _keep_pending(get_pending, backend):
    """On an error that ends training (data, eval, out of memory...), a checkpoint still being written in
    the background is committed first, as a blocking save would have been. One process only: with
    several, the others may not reach the collectives a commit needs; the .tmp is then removed later."""
    try:
        yield
    except Exception:
        pending = get_pending()
        if pending is not None and backend.process_count == 1:
            try:
                log.info("checkpoint %s (committed before stopping on the error below)", pending.finish())
            except Exception as e:    # noqa: BLE001  (the original error is the one to report)
                log.warning("the checkpoint at step %d being written could not be committed: %s", pending.step, e)
        raise


def _agree_step(backend, requested: bool, written: bool) -> tuple[bool, bool]:
    """After each step, every process learns the same two things: whether any was asked to stop (a
    signal on one stops all after the same step), and whether every process's background checkpoint
    write has ended (then all commit it at this step)."""
    if backend.process_count == 1:
        return requested, written
    v = backend.allreduce(np.array([int(requested), int(not written)], np.uint64))
    return bool(v[0]), not bool(v[1])


def _precompile(backend, data: TokenData, run: Run, start_step: int) -> dict:
    """Trial run: compile the train and eval steps at the run's shapes (filling the persistent compile
    cache: XLA's, Neuron's) without changing anything on disk — no metrics, no checkpoint."""
    tokens = data.train_batch(start_step, run.global_batch).reshape(run.accum, run.micro_batch, run.seq_len + 1)
    t0 = time.perf_counter()
    backend.train_step(tokens, 0.0)       # lr 0: a trial step, and nothing is saved anyway
    evaluate(backend, data, run)
    compilations = backend.compilations()
    log.info("precompiled the train and eval steps in %.1fs: %s", time.perf_counter() - t0, compilations or "-")
    return {"run_dir": str(run.run_dir), "start_step": start_step, "last": {}, "compilations": compilations,
            "precompile": True}


def evaluate(backend, data: TokenData, run: Run) -> float:
    """Mean held-out loss over trainer.eval_batches global batches, at the train step's micro-batch shape."""
    tokens = [data.eval_batch(i, run.global_batch) for i in range(run.eval_batches)]
    batch = np.stack(tokens).reshape(run.eval_batches * run.accum, run.micro_batch, run.seq_len + 1)
    return backend.eval_loss(batch)
