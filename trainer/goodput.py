"""Goodput: the share of a run's wall time spent in productive train steps, and where the rest went.

A Clock starts when the process started (launch.train: the kernel's record of this process's start) or, for
train() called from Python, when it was called. The loop runs its non-training work inside named phases
(`with clock.phase("eval"): ...`), reports each train step's time (`clock.step(seconds)`) and marks the
moment the backend is ready (`clock.ready()`). The wall time since the origin then splits into productive
step time and lost time (badput) of these kinds:

    startup     origin -> backend ready (interpreter, imports, Hydra, devices), less the phases within it
    data_open   opening the data (tokenizing a corpus, mapping shards, the unigram baseline)
    data_read   reading each step's batch
    restore     placing the start state: the checkpoint read, or a fresh run's reference init
    compile     the first step's time beyond a steady step (the median of up to STEADY_STEPS later ones)
    checkpoint  the loop blocked in a checkpoint save or commit (an async write's background time is not)
    eval        held-out evaluation
    sample      text samples (trainer.sample_every)
    profile     writing profiler traces (trainer.profile)
    loggers     opening metrics.jsonl, TensorBoard and the trackers, and writing each metrics line to them
    other       the rest: log lines, locks, run records, agreement between processes

After warm-up: the steps after a launch's first one against the wall time from the end of that first step to
the end of the latest one, so startup, restore, compile and whatever follows the last step (the final
checkpoint) are left out, and the stalls between steps (checkpoints, evaluation, data) are not.

Restart to first step: the time from the origin to the end of the launch's first train step (fresh or
resumed), in parts: startup, data_open (the opening and the first batch), restore, loggers, first_step (its
compile within it, once steady steps say how much that was) and other.

No jax or torch here: the numbers are wall-clock time.perf_counter() seconds.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

IMPORTED = time.perf_counter()      # the origin where the process start cannot be read
PHASES = ("startup", "data_open", "data_read", "restore", "checkpoint", "eval", "sample", "profile", "loggers")
KINDS = PHASES[:4] + ("compile",) + PHASES[4:] + ("other",)
STEADY_STEPS = 20


def process_age() -> float:
    """Seconds since this process started, from Linux's /proc: the start time in clock ticks after boot
    (/proc/self/stat field 22) against the seconds since boot (/proc/uptime), both counted from the same
    boot, to the tick (10 ms). Raises OSError or ValueError where /proc cannot say."""
    with open("/proc/self/stat") as f:
        stat = f.read()
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    fields = stat[stat.rindex(")") + 2:].split()      # after the command name, which may hold spaces
    age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    if not 0 <= age < 365 * 86400:
        raise ValueError(f"implausible process age {age}")
    return age


def process_start() -> tuple[float, str]:
    """(this process's start on time.perf_counter()'s clock, where that came from): the kernel's record on
    Linux, else the moment trainer.goodput was first imported (launch.train imports it first)."""
    now = time.perf_counter()
    try:
        return now - process_age(), "process start"
    except (OSError, ValueError, IndexError):
        return IMPORTED, "import of trainer.goodput (no /proc)"


class Clock:
    """Wall time since `origin` (a `timer` value, default time.perf_counter(); default: now) split into
    productive train-step time and named lost time. `origin_source` says what the origin is, for the records."""

    def __init__(self, origin: float | None = None, origin_source: str = "train() call", timer=time.perf_counter):
        self.timer = timer
        self.origin = timer() if origin is None else origin
        self.origin_source = origin_source
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.step_times: list[float] = []       # this launch's train steps, in order
        self.step_ends: list[float] = []        # when each ended (elapsed seconds)
        self.ready_at: float | None = None
        self.first: dict | None = None          # the restart record's parts, taken at the first step
        self._depth = 0

    @classmethod
    def from_process_start(cls) -> "Clock":
        return cls(*process_start())

    def elapsed(self) -> float:
        return self.timer() - self.origin

    @contextlib.contextmanager
    def phase(self, kind: str):
        """Time spent inside counts as `kind`; a phase inside another counts as the outer one."""
        if kind not in PHASES or kind == "startup":
            raise ValueError(f"unknown phase {kind!r}; one of {', '.join(PHASES[1:])}")
        self._depth += 1
        t0 = self.timer()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds[kind] += self.timer() - t0

    def ready(self, ago: float = 0.0) -> None:
        """The backend was made `ago` seconds ago: the time until then not in a phase was startup."""
        if self.ready_at is None:
            self.ready_at = self.elapsed() - ago
            self.seconds["startup"] = max(0.0, self.ready_at - sum(self.seconds.values()))

    def step(self, seconds: float) -> None:
        """A train step of `seconds` ended now."""
        self.step_times.append(seconds)
        self.step_ends.append(self.elapsed())
        if self.first is None:
            self.ready(ago=seconds)          # at the latest when this step began
            at = self.elapsed()
            parts = {"startup_s": self.seconds["startup"],
                     "data_open_s": self.seconds["data_open"] + self.seconds["data_read"],
                     "restore_s": self.seconds["restore"], "loggers_s": self.seconds["loggers"],
                     "first_step_s": seconds}
            self.first = {"restart_to_first_step_s": at, **parts, "other_s": max(0.0, at - sum(parts.values()))}

    def compile_seconds(self) -> float | None:
        """The first step's time beyond the median of up to STEADY_STEPS steps after it; None before a second
        step."""
        if len(self.step_times) < 2:
            return None
        steady = statistics.median(self.step_times[1:1 + STEADY_STEPS])
        return max(0.0, self.step_times[0] - steady)

    def restart(self) -> dict | None:
        """The restart-to-first-step record (None before the first step): seconds, with compile_s (None while
        only one step has run) and what the origin is."""
        if self.first is None:
            return None
        return {**self.first, "compile_s": self.compile_seconds(), "origin": self.origin_source}

    def after_warmup(self) -> float | None:
        """The steps after the first against the wall time from the first step's end to the latest one's;
        None before a second step."""
        if len(self.step_ends) < 2:
            return None
        window = self.step_ends[-1] - self.step_ends[0]
        return sum(self.step_times[1:]) / window if window > 0 else None

    def summary(self) -> dict:
        """Goodput so far: wall_s, productive_s, goodput (productive / wall), badput_s and badput ({kind:
        seconds} and {kind: fraction of wall}, summing with productive time to the wall time), and
        goodput_after_warmup (see after_warmup)."""
        wall = self.elapsed()
        compile_s = self.compile_seconds() or 0.0
        productive = sum(self.step_times) - compile_s
        lost = dict(self.seconds, compile=compile_s)
        if self.ready_at is None:           # still starting: all of it so far is startup
            lost["startup"] = max(0.0, wall - sum(v for k, v in lost.items() if k != "startup"))
        lost["other"] = max(0.0, wall - productive - sum(lost.values()))
        badput_s = {k: lost[k] for k in KINDS}
        share = (lambda s: s / wall) if wall > 0 else (lambda s: 0.0)
        return {"wall_s": wall, "productive_s": productive, "goodput": share(productive), "badput_s": badput_s,
                "badput": {k: share(v) for k, v in badput_s.items()}, "goodput_after_warmup": self.after_warmup(),
                "origin": self.origin_source}

    def metrics(self) -> dict:
        """The summary as metrics-line keys: goodput, goodput_after_warmup (from the second step on),
        badput/<kind> (fractions of the wall time) and wall_s."""
        s = self.summary()
        steady = {} if s["goodput_after_warmup"] is None else {"goodput_after_warmup": s["goodput_after_warmup"]}
        return {"goodput": s["goodput"], **steady, **{f"badput/{k}": v for k, v in s["badput"].items()},
                "wall_s": s["wall_s"]}


def describe(summary: dict) -> str:
    """One line for the log: goodput, then the lost time by kind, largest first."""
    wall = summary["wall_s"]
    lost = sorted(((v, k) for k, v in summary["badput_s"].items() if v >= 0.0005 * max(wall, 1e-9)), reverse=True)
    parts = ", ".join(f"{k} {v:.1f}s ({100 * summary['badput'][k]:.1f}%)" for v, k in lost)
    steady = summary.get("goodput_after_warmup")
    return (f"goodput {100 * summary['goodput']:.1f}% of {wall:.1f}s since the {summary['origin']}"
            + (f" ({100 * steady:.1f}% after warm-up)" if steady is not None else "")
            + (f"; lost to {parts}" if parts else ""))


def describe_restart(restart: dict) -> str:
    """One line for the log: the restart-to-first-step time and its parts."""
    parts = ", ".join(f"{k[:-2].replace('_', ' ')} {restart[k]:.1f}s"
                      for k in ("startup_s", "data_open_s", "restore_s", "loggers_s", "first_step_s", "other_s"))
    return f"first step done {restart['restart_to_first_step_s']:.1f}s after the {restart['origin']} ({parts})"
