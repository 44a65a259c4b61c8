"""The training loop: the same on every backend.

    lock the run dir; the Checkpointer locks the checkpoint location      (trainer.checkpointer)
    state   <- the newest good checkpoint, or trainer.init_from, or the reference init (seed)
    for step in [state.step, trainer.steps):
        tokens <- data.train_batch(step)            a pure function of (seed, step)
        lr     <- schedule(step)                    a pure function of the updates done
        backend.train_step(tokens, lr)              one compiled step, one optimizer update
        metrics.jsonl, log line, eval               Report
        checkpoint                                  Checkpointer.save, by policy; commit when written
    stop on a signal after the step, with a checkpoint
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from hal.profile import check_window, device_memory, is_out_of_memory, make_profiler
from hal import (HostState, NonFiniteError, OptimizerSpec, StorageError, UserError, WrongModelError,
                 first_line, make_backend)
from models.spec import LlamaConfig, flops_per_token, num_params, reference_init
from models import hf
from configs.schema import validate
from trainer import checkpoint
from trainer.checkpointer import REMOTE_CACHE, STAGING, Checkpointer
from trainer.data import TokenData
from trainer.goodput import Clock, describe, describe_restart
from trainer.tokenizer import padded_vocab
from trainer import tokenizer as tk
from trainer.loggers import Loggers
from trainer.observe import OutOfMemory, TextSample, out_of_memory_message, peak_flops, peak_rss_bytes
from trainer.safety import RunLock, StopRequest
from trainer.schedule import learning_rate

log = logging.getLogger("trichip")
RUN_MARKER = "run.json"


# Bounds the schema's types cannot say: (section, key) -> (lowest, highest or None).
_RANGES = {("trainer", "steps"): (0, None), ("trainer", "global_batch"): (1, None), ("trainer", "seq_len"): (1, None),
           ("trainer", "log_every"): (1, None), ("trainer", "eval_every"): (0, None),
           ("trainer", "eval_batches"): (1, None), ("trainer", "checkpoint_every"): (0, None),
           ("trainer", "keep_checkpoints"): (1, None), ("optim", "lr"): (0.0, 3.0e38),
           ("optim", "warmup_steps"): (0, None), ("optim", "min_lr_ratio"): (0.0, 1.0), ("optim", "b1"): (0.0, 1.0),
           ("optim", "b2"): (0.0, 1.0), ("optim", "eps"): (0.0, 1.0), ("optim", "weight_decay"): (0.0, 10.0),
           ("optim", "max_grad_norm"): (1e-12, 1e12), ("data", "mixture_block_steps"): (0, None),
           ("trainer", "sample_every"): (0, None), ("trainer", "sample_tokens"): (1, None),
           ("trainer", "sample_temperature"): (0.0, 100.0), ("trainer", "loss_chunk"): (0, None)}
_AUTO_OR_BOOL = (("trainer", "async_save"), ("hal", "distributed"))


def check_config(cfg: dict) -> None:
    """The schema (configs/schema.py: keys, types, enum members), then ranges and auto-or-boolean keys."""
    validate(cfg)
    for (section, key), (lo, hi) in _RANGES.items():
        value = cfg[section][key]
        if value < lo or (hi is not None and value > hi) or (isinstance(lo, int) and not isinstance(value, int)):
            bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise UserError(f"{section}.{key} must be {'an integer' if isinstance(lo, int) else 'a number'} "
                            f"{bounds}, got {value!r}")
    for section, key in _AUTO_OR_BOOL:
        if not (isinstance(cfg[section][key], bool) or cfg[section][key] == "auto"):
            raise UserError(f"{section}.{key} must be auto, true or false, got {cfg[section][key]!r}")
    if cfg["seed"] < 0:
        raise UserError(f"seed must be a non-negative integer, got {cfg['seed']!r}")
    check_window(cfg["trainer"]["profile"]["steps"], cfg["trainer"]["profile"]["memory"])


class Run:
    """A validated run configuration (plain dict from Hydra) with everything derived from it."""

    def __init__(self, cfg: dict, run_dir: str | os.PathLike):
        check_config(cfg)
        self.cfg, self.run_dir, t, o = cfg, Path(run_dir), cfg["trainer"], cfg["optim"]
        try:
            self.model = LlamaConfig.from_dict(cfg["model"])
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None
        self.steps, self.global_batch, self.seq_len = t["steps"], t["global_batch"], t["seq_len"]
        self.micro_batch = t["micro_batch"] or self.global_batch
        if self.micro_batch < 1 or self.global_batch % self.micro_batch:
            raise UserError(f"trainer.global_batch ({self.global_batch}) must be a multiple of "
                            f"trainer.micro_batch ({self.micro_batch})")
        self.accum = self.global_batch // self.micro_batch
        if self.seq_len > self.model.max_position_embeddings:
            raise UserError(f"trainer.seq_len ({self.seq_len}) exceeds model.max_position_embeddings "
                            f"({self.model.max_position_embeddings})")
        self.log_every, self.eval_every, self.eval_batches = t["log_every"], t["eval_every"], t["eval_batches"]
        self.checkpoint_every, self.keep = t["checkpoint_every"], t["keep_checkpoints"]
        self.peak_lr, self.warmup, self.min_lr_ratio = float(o["lr"]), o["warmup_steps"], float(o["min_lr_ratio"])
        self.optim = OptimizerSpec(**{k: float(o[k]) for k in ("b1", "b2", "eps", "weight_decay", "max_grad_norm")})
        for key in ("precision", "remat", "precompile", "resume", "strict_resume", "fresh_if_damaged",
                    "allow_setting_changes", "init_weights_only", "on_nonfinite", "on_save_error", "async_save"):
            setattr(self, key, t[key])          # async_save auto: the backend's default
        self.tokens_per_step = self.global_batch * self.seq_len
        self.rows = None            # the global batch rows this process reads (train() asks the backend)
        self.seed = cfg["seed"]
        self.check_run_dir()
        self._ckpt_root = checkpoint.checkpoint_root(t["checkpoint_dir"], self.run_dir)
        self.init_from = t["init_from"]
        self.init_hf = bool(self.init_from) and "://" not in str(self.init_from) and hf.is_hf_dir(self.init_from)
        if self.init_from and not self.init_hf:
            self.init_ckpt = checkpoint.resolve(self.init_from)

    def settings(self) -> dict:
        """What a resumed run must keep (trainer.allow_setting_changes=true lets it change them)."""
        d = self.cfg["data"]
        return {"checkpoint_dir": self.cfg["trainer"]["checkpoint_dir"], "seed": self.seed,
                "data.path": d["path"], "data.sources": d["sources"], "data.tokenizer": d["tokenizer"]}

    def lr(self, count: int) -> float:
        return learning_rate(count, peak_lr=self.peak_lr, warmup_steps=self.warmup, total_steps=self.steps,
                             min_lr_ratio=self.min_lr_ratio, schedule=self.cfg["optim"]["schedule"])

    @property
    def ckpt_root(self):
        """run_dir/checkpoints, or trainer.checkpoint_dir: a trainer.storage.Location (a directory or a prefix)."""
        return self._ckpt_root

    def check_run_dir(self) -> None:
        check_run_dir(self.run_dir)

    def check_model(self, ckpt, manifest: dict) -> None:
        theirs = manifest.get("model", {})
        ours = self.model.to_dict()
        diff = [f"{k} {theirs.get(k)!r} vs {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
        if diff:
            raise WrongModelError(f"checkpoint {ckpt} was written for another model ({'; '.join(diff[:3])}); "
                                  f"use the model config it was trained with, or a new run")


def check_run_dir(d: Path) -> None:
    """A run dir is new, or one trichip made (it has run.json). Hydra's own files don't count."""
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise UserError(f"run dir {d} is a file; choose a directory (run_dir=...)")
    if not d.is_dir() or (d / RUN_MARKER).is_file():
        return
    foreign = [p.name for p in d.iterdir() if p.name not in (".hydra", ".lock", STAGING, REMOTE_CACHE)
               and not p.name.endswith(".log")]
    if foreign:
        raise UserError(f"run dir {d} is not a trichip run (no {RUN_MARKER}, holds {sorted(foreign)[:3]}); "
                        f"choose a new directory with run_dir=...")


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


def train(cfg: dict, run_dir: str | os.PathLike, config_yaml: str = "", clock: Clock | None = None) -> dict:
    """Run (or resume) training; returns a summary. Raises UserError for anything the user must change.
    `clock` accounts the wall time (trainer.goodput); launch.train starts it at the process start, a call
    from Python without one at the call."""
    clock = clock or Clock()
    check_config(cfg)
    with clock.phase("data_open"):
        data = open_data(cfg)
    cfg = _with_vocab(cfg, data)
    run = Run(cfg, run_dir)
    data.check_vocab(run.model.vocab_size)
    t = cfg["trainer"]
    masked = {"document_eos": data.eos_id} if cfg["data"]["document_mask"] else {}
    backend = make_backend(cfg["hal"], run.model, run.optim, t["precision"], run.remat, loss_chunk=t["loss_chunk"],
                           **masked)
    clock.ready()
    backend.check_batch(run.micro_batch)
    run.rows = _process_rows(run, backend)
    lead = backend.process_index == 0
    if not lead:
        log.setLevel(logging.WARNING)     # one process reports; all of them train
    if run.precompile:
        start_step, _ = _start_state(run, backend, None)
        return _precompile(backend, data, run, start_step)
    lock = RunLock(run.run_dir).acquire() if lead else None      # before anything is listed or read
    try:
        record = _run_record(run, backend.describe())
        if lead and not (run.run_dir / RUN_MARKER).exists():    # a new run's id exists before it claims anything
            run.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run.run_dir / RUN_MARKER, record)
        ckpt = Checkpointer(run.ckpt_root, run.run_dir, record["run_id"], backend, keep=run.keep,
                            async_save=backend.async_save_default if run.async_save == "auto" else run.async_save,
                            on_save_error=run.on_save_error, config_yaml=config_yaml).acquire()
        try:
            with clock.phase("restore"):
                start_step, source = _start_state(run, backend, ckpt)
            if lead:        # only once the run is known to go ahead: a refused run leaves run.json as it was
                run.run_dir.mkdir(parents=True, exist_ok=True)
                _write_json(run.run_dir / RUN_MARKER, record)
                data.save_tokenizer(run.run_dir)
            return _train(run, data, backend, ckpt, start_step, source, clock)
        finally:
            ckpt.release()
    finally:
        if lock:
            lock.release()


def _run_record(run: Run, info: dict) -> dict:
    """run.json as this run will write it: its identity (made on the first start) and the settings a resume
    must keep (checkpoint_dir, seed, data.path), which a run dir holding checkpoints refuses to change unless
    trainer.allow_setting_changes=true."""
    record = _read_record(run.run_dir / RUN_MARKER)
    settings = run.settings()
    theirs = record.get("settings") or {}
    changed = [f"{k} {theirs[k]!r} -> {v!r}" for k, v in settings.items() if k in theirs and theirs[k] != v]
    if record.get("run_id") and changed and _has_checkpoints(run, record):
        if not run.allow_setting_changes:
            raise UserError(f"run dir {run.run_dir} was started with other settings ({'; '.join(changed)}); "
                            f"use its own, a new run_dir, or trainer.allow_setting_changes=true")
    record.setdefault("run_id", uuid.uuid4().hex)
    record.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    record.setdefault("first_writer", info)
    record.update(model=run.model.to_dict(), settings=settings)
    return record


def _read_record(marker: Path) -> dict:
    try:
        record = json.loads(marker.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise UserError(f"{marker} is not JSON: restore it, or choose a new run_dir") from None
    except OSError as e:
        raise StorageError(f"cannot read {marker}: {e.strerror}") from None
    if not isinstance(record, dict):
        raise UserError(f"{marker} is not a trichip run record: restore it, or choose a new run_dir")
    return record


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        raise StorageError(f"cannot write {path}: {e.strerror}") from None


def _has_checkpoints(run: Run, record: dict) -> bool:
    """Whether the run holds checkpoints where it kept them so far (its recorded checkpoint_dir) or where
    this launch would look."""
    recorded = checkpoint.checkpoint_root(record["settings"].get("checkpoint_dir"), run.run_dir)
    for root in {recorded, run.ckpt_root}:
        complete, unfinished = checkpoint.scan(root)
        if complete or (unfinished and not root.is_remote):
            return True
    return False


def _start_state(run: Run, backend, ckpt: Checkpointer | None) -> tuple[int, str]:
    """Place the state the run starts from; (its step, where it came from). The run dir's checkpoints come
    first (through the Checkpointer, which holds the locks), then trainer.init_from, then the reference init."""
    if ckpt is not None and ckpt.candidates():
        if not run.resume:
            raise UserError(f"{run.ckpt_root} already holds checkpoints and trainer.resume=false: choose a new "
                            f"run_dir (or trainer.checkpoint_dir), or resume")
        step, manifest, where = ckpt.restore(run.check_model, run.strict_resume, run.fresh_if_damaged)
        if manifest is not None:
            return step, _describe_source(where, manifest)
    elif run.init_hf:       # weights only: fresh optimizer state, step 0
        run.check_model(run.init_from, {"model": hf.read_hf_config(run.init_from)[0].to_dict()})
        backend.set_state(HostState.fresh(hf.read_hf_dir(run.init_from)[1]))
        return 0, f"Hugging Face directory {run.init_from} (weights only)"
    elif run.init_from:
        manifest = checkpoint.read_manifest(run.init_ckpt)
        run.check_model(run.init_ckpt, manifest)
        checkpoint.load(run.init_ckpt, backend, cache=run.run_dir / REMOTE_CACHE, manifest=manifest)
        if run.init_weights_only:
            backend.set_state(HostState.fresh(backend.get_state().params))
            return 0, _describe_source(run.init_ckpt, manifest) + " (weights only)"
        return manifest["step"], _describe_source(run.init_ckpt, manifest)
    backend.set_state(HostState.fresh(reference_init(run.model, run.seed)))
    return 0, "reference init"


def _describe_source(ckpt, manifest: dict) -> str:
    w = manifest.get("writer") or {}
    return (f"{ckpt} (step {manifest['step']}, written by {w.get('framework', '?')} on {w.get('platform', '?')}, "
            f"mesh {w.get('mesh')})")


def _process_rows(run: Run, backend) -> np.ndarray:
    """The rows of the global batch this process reads: its devices' rows of each micro-batch."""
    mine = backend.batch_rows(run.micro_batch)
    if backend.process_count > 1:
        log.info("process %d reads rows %d:%d of each micro-batch of %d", backend.process_index, mine.start,
                 mine.stop, run.micro_batch)
    return (np.arange(run.accum)[:, None] * run.micro_batch + np.arange(run.micro_batch)[mine][None, :]).ravel()


def open_data(cfg: dict) -> TokenData:
    d, t = cfg["data"], cfg["trainer"]
    return TokenData(d["path"], t["seq_len"], cfg["seed"], d["eval_fraction"], sources=d["sources"],
                     tokenizer=d["tokenizer"], mixture_block_steps=d["mixture_block_steps"])


def _with_vocab(cfg: dict, data: TokenData) -> dict:
    """data.vocab=tokenizer|pad128: the model's vocab_size from the data's tokenizer (padded to a multiple of
    128, as published checkpoints do for speed)."""
    policy, size = cfg["data"]["vocab"], data.tokenizer["vocab_size"]
    if policy == "check":
        return cfg
    vocab = size if policy == "tokenizer" else padded_vocab(size)
    return dict(cfg, model=dict(cfg["model"], vocab_size=vocab))


def _train(run: Run, data: TokenData, backend, ckpt: Checkpointer, start_step: int, source: str,
           clock: Clock) -> dict:
    info = backend.describe()
    report = Report(run, backend, info, start_step, data, clock)
    log.info("%s on %s: %d device(s) in %d process(es), mesh %s (%s)", info["framework"], info["platform"],
             info["device_count"], info["process_count"], info.get("mesh", {}), info.get("mesh_source", "-"))
    log.info("%s params, %d steps of %d tokens; start at step %d from %s",
             f"{num_params(run.model):,}", run.steps, run.tokens_per_step, start_step, source)
    if log.isEnabledFor(logging.INFO):     # the lead process: the others log warnings only
        with clock.phase("data_open"):
            log.info("unigram baseline of the data: %.4f nats/token", data.unigram_entropy())
    meta = {"model": run.model.to_dict(), "writer": info,
            "data": {"path": run.cfg["data"]["path"], "seed": run.seed, "next_step": None,
                     "tokenizer": data.tokenizer}, "rng": {"seed": run.seed}}
    saved_at, preempted = start_step, ""
    with report, StopRequest() as stop, _keep_pending(ckpt):
        for step in range(start_step, run.steps):
            done, m = _one_step(run, data, backend, report, step, clock)
            if (run.checkpoint_every and done % run.checkpoint_every == 0) or done == run.steps:
                with clock.phase("checkpoint"):
                    ckpt.save(done, _cursor(meta, done), wait=done == run.steps)
                saved_at = done
            stop_now, written = _agree_step(backend, stop.signum is not None, ckpt.ready())
            if written:
                with clock.phase("checkpoint"):
                    ckpt.commit()
            if stop_now:
                if saved_at != done:
                    with clock.phase("checkpoint"):
                        ckpt.save(done, _cursor(meta, done), wait=True)
                preempted = stop.name or "a signal on another process"
                log.info("stopped by %s at step %d: checkpoint written; run the same command to resume",
                         preempted, done)
                break
        with clock.phase("checkpoint"):
            ckpt.close()
    return _finish(run, backend, ckpt, report, start_step, preempted, clock)


def _cursor(meta: dict, done: int) -> dict:
    return dict(meta, data=dict(meta["data"], next_step=done))


def _one_step(run: Run, data: TokenData, backend, report: "Report", step: int, clock: Clock):
    """Train step `step` (0-based), evaluate when due, report; stop on a non-finite loss when asked to."""
    t0 = time.perf_counter()
    with clock.phase("data_read"):
        tokens = data.train_batch(step, run.global_batch, run.rows).reshape(run.accum, -1, run.seq_len + 1)
    lr = run.lr(step)
    t_step = time.perf_counter()
    with report.watch(step + 1):
        m = backend.train_step(tokens, lr)
    dt = time.perf_counter() - t0
    clock.step(time.perf_counter() - t_step)
    done = step + 1
    extra = _epochs(data.epochs(done, run.global_batch))
    if run.eval_every and (done % run.eval_every == 0 or done == run.steps):
        with clock.phase("eval"):
            extra.update(evaluate(backend, data, run))
    report.step(done, m, lr, dt, extra)
    if m.skipped:
        if run.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss ({m.loss}) or gradient norm ({m.grad_norm}) at step "
                                 f"{done}; the update was not applied and the last good checkpoint is kept "
                                 f"(set trainer.on_nonfinite=skip to skip such steps)")
        log.warning("step %d: non-finite loss (%s) or gradient norm (%s): update skipped", done, m.loss,
                    m.grad_norm)
    return done, m


def _finish(run: Run, backend, ckpt: Checkpointer, report: "Report", start_step: int, preempted: str,
            clock: Clock) -> dict:
    """The run's summary; run.json records what it wrote, its restart-to-first-step time and goodput (with the
    persistent compile cache it used), and a run that wrote no checkpoint says so loudly."""
    compilations = backend.compilations()
    if compilations:
        log.info("compilations: %s", compilations)
    saved = ckpt.summary()
    if ckpt.failures:
        log.error("%d checkpoint save(s) failed in this run; the newest checkpoint to resume from is %s",
                  len(ckpt.failures), saved["latest_checkpoint"] if saved["latest_checkpoint"] is not None
                  else "none: this run wrote no checkpoint")
    goodput, restart = clock.summary(), clock.restart()
    log.info("%s", describe(goodput))
    timing = {"restart": restart, "goodput": goodput, "compile_cache_dir": backend.compile_cache_dir}
    if ckpt.lead:
        marker = run.run_dir / RUN_MARKER
        _write_json(marker, dict(_read_record(marker), last_run=dict(saved, **report.peak_memory(), **timing)))
    return {"run_dir": str(run.run_dir), "start_step": start_step, "last": report.last,
            "compilations": compilations, "preempted": preempted, **saved, **timing}


class Report:
    """What a person watching the run sees: metrics.jsonl (one JSON object a step; non-finite values are
    null), the log line every log_every steps, the loggers (TensorBoard, trackers) and the progress bar,
    from process 0; on every process the profiler's window (trainer.profile), device memory, samples of
    text (trainer.sample_every) and out-of-memory errors that say what to change."""

    def __init__(self, run: Run, backend, info: dict, start_step: int, data: TokenData, clock: Clock):
        self.run, self.lead, self.last, self.backend, self.clock = run, backend.process_index == 0, {}, backend, clock
        t = run.cfg["trainer"]
        self.profiler = make_profiler(backend, run.run_dir / "profile", t["profile"]["steps"], t["profile"]["memory"],
                                      start_step, run.steps)
        self.sample = _text_sample(t, run, data) if t["sample_every"] else None
        self.path = run.run_dir / "metrics.jsonl"
        self.peak = peak_flops(info.get("device_kind", ""), run.precision, run.cfg["trainer"]["peak_tflops"])
        self.devices = info["device_count"]
        self.flops_per_token = flops_per_token(run.model, run.seq_len)
        self.file, self.bar, self.loggers, self._redirect = None, None, None, contextlib.nullcontext()
        if self.lead:
            _metrics_upto(self.path, start_step)
            self.bar = _progress(run.steps, start_step)
            self._redirect = _redirect_logging(self.bar)

    def __enter__(self) -> "Report":
        with self.clock.phase("loggers"):
            self._open()
        self._redirect.__enter__()
        return self

    def _open(self) -> None:
        if self.lead:
            try:
                self.file = open(self.path, "a")
            except OSError as e:
                raise StorageError(f"cannot write {self.path}: {e.strerror}") from None
            t = self.run.cfg["trainer"]
            run_id = _read_record(self.run.run_dir / RUN_MARKER)["run_id"]
            self.loggers = Loggers(t["loggers"], self.run.run_dir, run_id, t["experiment"], t["tensorboard"])
            self.loggers.config(self.run.cfg)

    def __exit__(self, *exc) -> None:
        self._redirect.__exit__(*exc)
        if self.profiler:
            self.profiler.stop()
        if self.bar:
            self.bar.close()
        if self.loggers:
            with self.clock.phase("loggers"):
                self.loggers.close()
        if self.file:
            try:
                self.file.close()
            except OSError as e:    # the last lines did not reach the disk; an error in flight says more
                if exc[1] is None:
                    raise StorageError(f"cannot write {self.path}: {e.strerror}") from None

    def step(self, done: int, m, lr: float, dt: float, extra: dict) -> None:
        """One metrics line: the step's numbers plus `extra` (epochs; eval_loss, eval_bpb when evaluated); the
        launch's first step adds its restart-to-first-step time (`restart_to_first_step_s`, `restart/<part>_s`),
        and every log_every steps the goodput so far (`goodput`, `badput/<kind>`, `wall_s`)."""
        last = {"step": done, "loss": m.loss, "lr": lr, "grad_norm": m.grad_norm,
                "tokens_per_s": self.run.tokens_per_step / dt, "step_time_s": dt}
        if self.peak:
            last["mfu"] = self.flops_per_token * last["tokens_per_s"] / (self.peak * self.devices)
        if m.skipped:
            last["skipped"] = True
        if self.profiler and self.profiler.covers(done):
            last["profiled"] = True         # slower than the others
            with self.clock.phase("profile"):
                self.profiler.stop(after_step=done)
        last.update(device_memory(self.backend))
        last.update(extra)
        if len(self.clock.step_times) == 1:
            last.update(_restart_metrics(self.clock.restart()))
            log.info("%s", describe_restart(self.clock.restart()))
        if done % self.run.log_every == 0 or done == self.run.steps:
            last.update(self.clock.metrics())
        self.last = last
        sample = None
        if self.sample and self.sample.due(done):
            with self.clock.phase("sample"):
                sample = self.sample(self.backend, done)
        if not self.lead:
            return
        try:
            with self.clock.phase("loggers"):
                self.file.write(json.dumps({k: _json_number(v) for k, v in last.items()}) + "\n")
                self.file.flush()
                self.loggers.add(done, last)
                if sample is not None:
                    self.loggers.text(done, "sample", sample)
        except OSError as e:
            raise StorageError(f"cannot write the metrics of step {done} to {self.run.run_dir}: "
                               f"{e.strerror or first_line(e)}") from None
        self._log_line(done, m, lr, last)
        if sample is not None:
            log.info("sample at step %d: %r", done, sample)

    @contextlib.contextmanager
    def watch(self, step: int):
        """Around train step `step`: the profiler's window, and running out of memory as one line that says
        with which settings and what to change."""
        try:
            with self.profiler.step(step) if self.profiler else contextlib.nullcontext():
                yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            peak = device_memory(self.backend).get("device_mem_peak_gib")
            r = self.run
            raise OutOfMemory(out_of_memory_message(step, r.micro_batch, r.global_batch, r.seq_len, r.remat,
                                                    peak and int(peak * 2**30), first_line(e))) from None

    def peak_memory(self) -> dict:
        """For run.json: this process's peak resident set, and its device peak on accelerators."""
        peak = device_memory(self.backend).get("device_mem_peak_gib")
        return {"peak_rss_bytes": peak_rss_bytes(), **({"device_peak_bytes": int(peak * 2**30)} if peak else {})}

    def _log_line(self, done: int, m, lr: float, last: dict) -> None:
        if done % self.run.log_every == 0 or done == self.run.steps or "eval_loss" in last:
            line = (f"step {done}/{self.run.steps} | loss {m.loss:.4f} | lr {lr:.3g} | grad_norm {m.grad_norm:.3f}"
                    f" | {last['tokens_per_s']:,.0f} tok/s")
            if "mfu" in last:
                line += f" | MFU {100 * last['mfu']:.1f}%"
            if "eval_loss" in last:
                line += f" | eval_loss {last['eval_loss']:.4f}"
            if last.get("eval_bpb") is not None:
                line += f" | eval_bpb {last['eval_bpb']:.4f}"
            log.info(line)
        if self.bar:
            extra = {"mfu": f"{100 * last['mfu']:.1f}%"} if "mfu" in last else {}
            self.bar.set_postfix(loss=f"{m.loss:.4f}", tok_s=f"{last['tokens_per_s']:,.0f}", **extra, refresh=False)
            self.bar.update(1)


def _restart_metrics(restart: dict) -> dict:
    """The restart record as metrics keys: restart_to_first_step_s, restart/<part>_s (compile is not known yet)."""
    return {"restart_to_first_step_s": restart["restart_to_first_step_s"],
            **{f"restart/{k}": v for k, v in restart.items()
               if k.endswith("_s") and k not in ("restart_to_first_step_s", "compile_s")}}


def _text_sample(t: dict, run: Run, data: TokenData) -> TextSample | None:
    tokenizer = tk.for_checkpoint(data.tokenizer, data.sources[0].stream.directory)
    if tokenizer is None:
        log.warning("trainer.sample_every: the data's tokenizer.json was not found beside it: no samples")
        return None
    return TextSample(t, run.model, tokenizer, run.seed)


def _json_number(value):
    """NaN and infinities as null: metrics.jsonl stays valid JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextlib.contextmanager
def _keep_pending(ckpt: Checkpointer):
    """On an error that ends training (data, eval, out of memory, a non-finite loss...), a checkpoint still
    being written in the background is committed first, as a blocking save would have been. One process
    only: with several, the others may not reach the collectives a commit needs; the .tmp is then removed
    by the next run's pruning."""
    try:
        yield
    except BaseException as error:
        busy = ckpt.pending is not None or ckpt.uploading is not None
        if busy and (ckpt.backend.process_count == 1 or isinstance(error, NonFiniteError)):
            try:
                ckpt.close()
            except Exception as e:    # noqa: BLE001  (the original error is the one to report)
                log.warning("the checkpoint being written could not be committed: %s", first_line(e))
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


def evaluate(backend, data: TokenData, run: Run) -> dict:
    """Held-out loss and bits per byte over trainer.eval_batches global batches of each source, at the
    train step's micro-batch shape; with several sources also per source (`eval_loss/NAME`), and overall
    as the mixture's weighted mean."""
    out, weights = {}, [s.weight for s in data.sources]
    for k, src in enumerate(data.sources):
        tokens = [data.eval_batch(i, run.global_batch, k, run.rows) for i in range(run.eval_batches)]
        batch = np.stack(tokens).reshape(run.eval_batches * run.accum, -1, run.seq_len + 1)
        loss = backend.eval_loss(batch)
        suffix = f"/{src.name}" if len(data.sources) > 1 else ""
        out[f"eval_loss{suffix}"], out[f"eval_bpb{suffix}"] = loss, data.bits_per_byte(loss, k)
    if len(data.sources) > 1:
        for key in ("eval_loss", "eval_bpb"):
            parts = [out[f"{key}/{s.name}"] for s in data.sources]
            out[key] = None if None in parts else float(np.average(parts, weights=weights))
    return out


def _epochs(epochs: dict) -> dict:
    """Metrics keys for the epochs: `epoch` for one source, `epoch/NAME` for each of a mixture's."""
    if len(epochs) == 1:
        return {"epoch": next(iter(epochs.values()))}
    return {f"epoch/{name}": e for name, e in epochs.items()}
