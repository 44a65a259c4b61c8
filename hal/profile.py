"""Looking inside the train step on every backend: a profiler trace of a window of steps, device memory in
use and at its peak, memory snapshots, and out-of-memory errors told apart from other failures.

Traces go to run_dir/profile/, one per process:
  JAX    process<i>/plugins/profile/<time>/<host>.xplane.pb (TensorBoard's profile plugin / XProf; a
         <host>.trace.json.gz beside it opens in Perfetto), and with memory=true
         memory-process<i>-step<N>.prof (jax.profiler.save_device_memory_profile: pprof)
  torch  torch-process<i>-steps<a>-<b>.pt.trace.json (torch.profiler, Chrome trace JSON: Perfetto,
         chrome://tracing), CPU and CUDA activities with shapes and Python stacks; with memory=true on
         CUDA memory-process<i>-step<N>.pickle (torch.cuda.memory._record_memory_history's snapshot,
         https://pytorch.org/memory_viz), on CPUs the allocations recorded in the trace itself
Each profiled step is annotated `train_step` (a JAX StepTraceAnnotation / a torch record_function).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from hal.base import Backend, UserError

log = logging.getLogger("trichip")
STEP_NAME = "train_step"
MEMORY_HISTORY_ENTRIES = 100_000


class Profiler:
    """Traces steps first..last (numbered as metrics.jsonl numbers them: 1 is the first update)."""

    def __init__(self, backend: Backend, out_dir: Path, first: int, last: int, memory: bool = False):
        self.backend, self.out_dir, self.first, self.last, self.memory = backend, Path(out_dir), first, last, memory
        self.running = False
        self.files: list[Path] = []
        self._trace = _JaxTrace(self) if backend.framework == "jax" else _TorchTrace(self)

    def covers(self, step: int) -> bool:
        return self.first <= step <= self.last

    @contextlib.contextmanager
    def step(self, step: int):
        """Around one train step: starts the trace before the window's first step (or the first step this
        run makes inside it) and annotates the step."""
        if not self.covers(step):
            yield
            return
        if not self.running:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._trace.start()
            self.running = True
        with self._trace.annotate(step):
            yield

    def stop(self, after_step: int | None = None) -> None:
        """End the trace and write its files: after the window's last step (outside that step's time), or
        whenever the run ends (after_step None)."""
        if after_step is not None and after_step < self.last:
            return
        if self.running:
            self.running = False
            self.files += self._trace.stop()
            log.info("profile of steps %d-%d: %s", self.first, self.last, ", ".join(str(f) for f in self.files))


class _JaxTrace:
    def __init__(self, profiler: Profiler):
        import jax
        self.jax, self.p = jax, profiler
        self.dir = profiler.out_dir / f"process{profiler.backend.process_index}"

    def start(self) -> None:
        self.jax.profiler.start_trace(str(self.dir))

    def annotate(self, step: int):
        return self.jax.profiler.StepTraceAnnotation(STEP_NAME, step_num=step)

    def stop(self) -> list[Path]:
        before = set(self.dir.rglob("*"))
        files = []
        if self.p.memory:
            path = self.p.out_dir / f"memory-process{self.p.backend.process_index}-step{self.p.last}.prof"
            self.jax.profiler.save_device_memory_profile(str(path))
            files.append(path)
        self.jax.profiler.stop_trace()
        return sorted(f for f in set(self.dir.rglob("*")) - before if f.is_file()) + files


class _TorchTrace:
    def __init__(self, profiler: Profiler):
        import torch
        self.torch, self.p = torch, profiler
        self.cuda = getattr(profiler.backend, "device", None) is not None and profiler.backend.device.type == "cuda"

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.p.memory and self.cuda:
            self.torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self.prof = profile(activities=activities, record_shapes=True, with_stack=True,
                            profile_memory=self.p.memory)
        self.prof.__enter__()

    def annotate(self, step: int):
        return self.torch.profiler.record_function(STEP_NAME)

    def stop(self) -> list[Path]:
        i, p = self.p.backend.process_index, self.p
        if self.cuda:
            self.torch.cuda.synchronize()      # the optimizer's kernels run after the step's loss is read
        self.prof.__exit__(None, None, None)
        trace = p.out_dir / f"torch-process{i}-steps{p.first}-{p.last}.pt.trace.json"
        self.prof.export_chrome_trace(str(trace))
        files = [trace]
        if p.memory and self.cuda:
            snapshot = p.out_dir / f"memory-process{i}-step{p.last}.pickle"
            self.torch.cuda.memory._dump_snapshot(str(snapshot))
            self.torch.cuda.memory._record_memory_history(enabled=None)
            files.append(snapshot)
        return files


def check_window(steps, memory: bool) -> list:
    """trainer.profile as [first, last] (or [] for no profile), with one-line errors for anything else."""
    steps = list(steps or [])
    if not steps:
        if memory:
            raise UserError("trainer.profile.memory=true needs a window: set trainer.profile.steps=[first, last]")
        return []
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        raise UserError(f"trainer.profile.steps must be [first, last] with 1 <= first <= last, got {steps}")
    return steps


def make_profiler(backend: Backend, out_dir: Path, steps, memory: bool, start_step: int,
                  total_steps: int) -> Profiler | None:
    """The profiler of trainer.profile (None when steps is empty or the window is already behind the run)."""
    steps = check_window(steps, memory)
    if not steps:
        return None
    first, last = steps[0], min(steps[1], total_steps)
    if last <= start_step or first > total_steps:
        log.info("trainer.profile.steps=%s is outside the steps this run makes (%d-%d): no trace", steps,
                 start_step + 1, total_steps)
        return None
    return Profiler(backend, out_dir, first, last, memory)


def device_memory(backend: Backend) -> dict:
    """Device memory of this process's busiest device, in GiB: {device_mem_gib, device_mem_peak_gib}; {} on
    CPUs and wherever the runtime reports none."""
    if backend.platform == "cpu":
        return {}
    if backend.framework == "jax":
        import jax
        stats = [d.memory_stats() for d in jax.local_devices()]
        stats = [s for s in stats if s]
        if not stats:
            return {}
        return {"device_mem_gib": max(s.get("bytes_in_use", 0) for s in stats) / 2**30,
                "device_mem_peak_gib": max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**30}
    device = getattr(backend, "device", None)
    if device is None or device.type != "cuda":
        return {}
    import torch
    return {"device_mem_gib": torch.cuda.memory_allocated(device) / 2**30,
            "device_mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception from a train step means the memory ran out: MemoryError, torch's
    OutOfMemoryError (CUDA) or its CPU allocator's failure, XLA's RESOURCE_EXHAUSTED."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(error)
    if isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in text:
        return True
    return "RESOURCE_EXHAUSTED" in text and "memory" in text.lower()
