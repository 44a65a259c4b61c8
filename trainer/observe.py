"""What a person watching a run sees besides the log: MFU against the chip's peak, TensorBoard scalars."""
from __future__ import annotations

import logging
from pathlib import Path

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
    """Peak FLOP/s of one device at this precision, or None when unknown."""
    if override_tflops:
        return float(override_tflops) * 1e12
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name.lower() in (device_kind or "").lower():
            tflops = bf16 if precision == "bf16" else fp32
            return tflops * 1e12 if tflops else None
    return None


class Scalars:
    """TensorBoard event files in run_dir/tensorboard (tensorboardX; skipped with a note if missing)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
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
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(_tag(key), value, step)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                log.warning("TensorBoard events in %s could not be flushed: %s", self.logdir, e.strerror or e)


def _tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: eval_loss/web -> eval/loss/web, epoch -> train/epoch."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return f"train/{key}"
