"""What a person watching a run sees besides the log: MFU against the chip's peak, TensorBoard scalars and
text, the process's peak memory, and what an out-of-memory error says to change."""
from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import numpy as np

from models.errors import UserError

log = logging.getLogger("trichip")

# Dense peak TFLOP/s per device (bf16, fp32) from the vendors' data sheets; matched by substring of the
# device kind the backend reports. CPUs have no standard figure: set trainer.peak_tflops.
PEAK_TFLOPS = [
    ("H200", 989.0, 67.0), ("H100", 989.0, 67.0), ("A100", 312.0, 19.5), ("L4", 121.0, 30.3),
    ("TPU v5p", 459.0, None), ("TPU v6", 918.0, None), ("TPU v5 lite", 197.0, None), ("TPU v5e", 197.0, None),
    ("TPU v4", 275.0, None),
    ("TPU v5", 459.0, None),     # v5p as some runtimes name it; after "TPU v5 lite" / "TPU v5e", which it would match
]


def peak_flops(device_kind: str, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device at this precision, or None when unknown: the dense bf16 peak for bf16 and
    fp8, the fp32 peak for fp32. fp8 runs only the blocks' projections in float8, so its MFU is taken against
    the bf16 peak: fp8 and bf16 runs of a model compare directly (an fp8 speed-up shows as a higher MFU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name.lower() in (device_kind or "").lower():
            tflops = bf16 if precision in ("bf16", "fp8") else fp32
            return tflops * 1e12 if tflops else None
    return None


def scalar_values(values: dict) -> dict[str, float]:
    """A metrics line's numbers as {tag: value}: every int or float (not booleans, not the step), tagged as
    TensorBoard shows them (`_tag`). Every logger receives these."""
    return {_tag(k): v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _summary_writer_class():
    """tensorboardX's SummaryWriter. Importing tensorboardX imports torch where torch is installed, only to
    accept torch tensors (the loop logs floats): the largest import of a JAX run's start. A process that
    has not loaded torch imports tensorboardX with torch hidden (a None entry in sys.modules makes
    `import torch` raise ImportError, which tensorboardX handles), so it stays a NumPy-only writer."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return SummaryWriter


class Scalars:
    """TensorBoard event files in run_dir/tensorboard (tensorboardX; skipped with a note if missing): the
    scalars of every metrics line, the resolved config and samples of text."""
    name = "tensorboard"

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            SummaryWriter = _summary_writer_class()
        except ImportError:
            log.info("tensorboardX not installed: no TensorBoard event files (pip install tensorboardX)")
            return
        self.logdir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.logdir), flush_secs=10)

    def add(self, step: int, values: dict) -> None:
        """Queue the step's scalars. tensorboardX writes them from its own thread, which ends on a write error
        (a full disk): then its bounded queue would block this thread for ever, so that is an OSError here."""
        if self.writer is None:
            return
        worker = getattr(getattr(self.writer._get_file_writer(), "event_writer", None), "_worker", None)
        if worker is not None and not worker.is_alive():
            self.writer = None
            raise OSError(f"the TensorBoard event writer for {self.logdir} stopped (a full disk?)")
        for tag, value in scalar_values(values).items():
            self.writer.add_scalar(tag, value, step)

    def config(self, text: str) -> None:
        """The resolved config (YAML), as the text `config` at step 0."""
        if self.writer is not None:
            self.writer.add_text("config", _preformatted(text), 0)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, _preformatted(text), step)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                log.warning("TensorBoard events in %s could not be flushed: %s", self.logdir, e.strerror or e)


def _tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: eval_loss/web -> eval/loss/web, epoch -> train/epoch; the run's
    time accounting as written (goodput, badput/<kind>, restart_to_first_step_s, restart/<part>_s)."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key in ("goodput", "restart_to_first_step_s") or key.startswith(("badput/", "restart/")):
        return key
    return f"train/{key}"


def _preformatted(text: str) -> str:
    """TensorBoard renders text as Markdown: indented four spaces it is shown as written."""
    return "\n".join("    " + line for line in text.splitlines())


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def out_of_memory_message(step: int, micro_batch: int, global_batch: int, seq_len: int, remat: bool,
                          device_peak: int | None, cause: str) -> str:
    """One line for a step that ran out of memory: the micro-batch and remat setting it ran with, the peak
    measured (device memory on accelerators, else this process's resident set), and what to change."""
    peak = f"device peak {gib(device_peak)}" if device_peak else f"process peak RSS {gib(peak_rss_bytes())}"
    fixes = []
    smaller = [m for m in range(micro_batch // 2, 0, -1) if global_batch % m == 0]
    if smaller:
        fixes.append(f"trainer.micro_batch={smaller[0]} (gradient accumulation keeps global_batch {global_batch})")
    if not remat:
        fixes.append("trainer.remat=true (recompute activations in the backward)")
    fixes.append("more devices (FSDP shards the state) or a shorter trainer.seq_len")
    return (f"out of memory in step {step} with micro-batch {micro_batch} x {seq_len} tokens, remat "
            f"{'on' if remat else 'off'}, {peak} ({cause}); try " + ", or ".join(fixes))


class OutOfMemory(UserError):
    """A step did not fit in memory: the message says with which settings and what to change."""


class TextSample:
    """trainer.sample_every: every N steps a short text continuing trainer.sample_prompt ("" = the start of a
    document: the end-of-document token) from the live params. Every process decodes (the params may be
    sharded); the caller logs it from process 0."""

    def __init__(self, trainer_cfg: dict, model, tokenizer, seed: int):
        t = trainer_cfg
        self.every, self.tokens, self.temperature = t["sample_every"], t["sample_tokens"], t["sample_temperature"]
        if self.every < 0 or self.tokens < 1 or self.temperature < 0:
            raise UserError(f"trainer.sample_every must be >= 0, trainer.sample_tokens >= 1 and "
                            f"trainer.sample_temperature >= 0 (got {self.every}, {self.tokens}, {self.temperature})")
        self.tokenizer, self.seed = tokenizer, seed
        ids = tokenizer.encode_batch([t["sample_prompt"]])[0] if t["sample_prompt"] else [tokenizer.eos_id]
        self.prompt = np.asarray(ids, np.int32)[None]
        if self.prompt.shape[1] + self.tokens > model.max_position_embeddings:
            raise UserError(f"trainer.sample_prompt ({self.prompt.shape[1]} tokens) + trainer.sample_tokens "
                            f"({self.tokens}) exceed model.max_position_embeddings ({model.max_position_embeddings})")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, backend, step: int) -> str:
        from hal.generate import generate_live
        out = generate_live(backend, self.prompt, self.tokens, self.temperature, top_k=50 if self.temperature else 0,
                            seed=self.seed * 1_000_003 + step)
        return self.tokenizer.decode(self.prompt[0].tolist() + out[0].tolist())
