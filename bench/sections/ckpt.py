"""Tables 4a-4d: trainer.checkpoint save/load against safetensors.numpy of the same tensors, the async save,
where a save's time goes, and hal.store's writer beside orbax's own formats."""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from pathlib import Path

from bench.sections.common import Report, f0, f1, f2, f3, jax_block, make_trichip, med, now, pct
from models.spec import SIZES
from trainer.data import TokenData

TIMES = ("save", "raw_save", "raw_save_sync", "load", "raw_load", "get_state", "digest", "write", "write_ocdbt",
         "write_default", "raw_sync_again", "read", "async_block", "async_copy", "step_alone", "step_beside",
         "async_total", "async_commit", "raw_pair", "write_after_unlink")


def settle(path=None) -> None:
    """Write back what is dirty: a file (its fsync), or with no path everything (the last round's truncations
    too). Untimed between measurements, so that the bench's own writeback does not run inside the next one."""
    if path is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Untimed, at the end of a round: free what the round wrote (truncate every file: its blocks and page
    cache go) but leave the files to be unlinked after the section. On this machine's ext4 (no journal) a
    file created within 30 s of others being unlinked makes the kernel check every recently freed inode of
    its block group first (recently_deleted in find_inode_bit): with the round before unlinked, the 681
    creates of a small-model checkpoint took 0.2 s of CPU, against 0.005-0.06 s without (a loop of tensorstore
    writes: 0.29 s vs 0.22 s, raw + fsync 0.21 s). Back-to-back rounds would charge every writer that creates
    files for the previous round's cleanup; 4d's last column shows a write right after one checkpoint's unlink.
    Keeping the files whole instead fills the page cache, and reclaim then slowed every writer (raw + fsync
    0.21 -> 0.57 s)."""
    for root, _, files in os.walk(path):
        for f in files:
            os.truncate(os.path.join(root, f), 0)


def raw_sync(path: str, tensors: dict) -> None:
    """safetensors.numpy save_file, then the fsync that makes it durable, as trichip's save is (tensorstore
    syncs what it writes)."""
    from safetensors.numpy import save_file
    save_file(tensors, path)
    settle(path)


def orbax_write(path: str, tensors: dict, compression: bool) -> None:
    """orbax's PyTreeCheckpointer as it comes (OCDBT; zstd unless compression=False), for table 4d."""
    import orbax.checkpoint as ocp

    from hal import store
    with ocp.PyTreeCheckpointer(use_compression=compression) as ckptr:
        ckptr.save(os.path.abspath(path), store._nested(tensors))


def blocking(r: int, d: Path, backend, meta: dict, host: dict, times: dict) -> None:
    """trainer.checkpoint save and load against safetensors save (with and without fsync) and load,
    in alternating order."""
    from safetensors.numpy import load_file, save_file

    from trainer import checkpoint
    order = ("trichip", "raw") if r % 2 == 0 else ("raw", "trichip")
    for who in order:
        if who == "trichip":
            t = now()
            path = checkpoint.save(d / "checkpoints", 1, backend, meta)
            times["save"].append(now() - t)
            t = now()
            checkpoint.load(path, backend)
            times["load"].append(now() - t)
        else:
            t = now()
            save_file(host, str(d / "raw.safetensors"))
            times["raw_save"].append(now() - t)
            settle(d / "raw.safetensors")
            t = now()
            raw_sync(str(d / "raw-sync.safetensors"), host)
            times["raw_save_sync"].append(now() - t)
            t = now()
            load_file(str(d / "raw.safetensors"))
            times["raw_load"].append(now() - t)


def parts(r: int, d: Path, backend, times: dict) -> dict:
    """Where a save's time goes, each part alone, and the writers side by side (alternated); returns the
    host state they wrote."""
    from hal import store
    t = now()
    state = backend.get_state().tensors()
    times["get_state"].append(now() - t)
    t = now()
    store.digests(state)
    times["digest"].append(now() - t)
    writers = [("write", lambda q: store.write_tensors(q, state)),
               ("write_ocdbt", lambda q: orbax_write(q, state, compression=False)),
               ("write_default", lambda q: orbax_write(q, state, compression=True)),
               ("raw_sync_again", lambda q: raw_sync(q, state))]
    for name, write in (writers if r % 2 == 0 else writers[::-1]):    # alternated
        t = now()
        write(str(d / name))
        times[name].append(now() - t)
    t = now()
    store.read_tensors(str(d / "write"), list(state))
    times["read"].append(now() - t)
    return state


def async_save(fw: str, d: Path, backend, meta: dict, host: dict, batch, times: dict) -> None:
    """trainer.async_save: what blocks the loop, and the step that runs beside the write."""
    from trainer import checkpoint
    t = now()
    backend.train_step(batch, 1e-3)
    times["step_alone"].append(now() - t)
    t0 = now()
    pending = checkpoint.PendingSave(d / "async", 1, backend, meta, background=True)
    times["async_block"].append(now() - t0)
    if fw == "jax":     # the device copy may still run after the call: wait for it, count it
        jax_block(pending.held)
        times["async_copy"].append(now() - t0 - times["async_block"][-1])
    t = now()
    backend.train_step(batch, 1e-3)
    times["step_beside"].append(now() - t)
    pending.finish()
    times["async_total"].append(now() - t0)
    commit_beside_raw(d, backend, meta, host, times)


def commit_beside_raw(d: Path, backend, meta: dict, host: dict, times: dict) -> None:
    """The async save with nothing beside it (from the call to its commit) and a durable raw write of the
    same bytes, back to back in alternated order, each from a synced disk: this machine's disk is shared,
    and its speed moves by 2x within a minute, so the pair is what the ratio is read from."""
    from trainer import checkpoint
    for who in ("commit", "raw") if len(times["async_commit"]) % 2 == 0 else ("raw", "commit"):
        settle()
        t0 = now()
        if who == "commit":
            checkpoint.PendingSave(d / "async-alone", 1, backend, meta, background=True).finish()
            times["async_commit"].append(now() - t0)
        else:
            raw_sync(str(d / "raw-pair.safetensors"), host)
            times["raw_pair"].append(now() - t0)


def measure(fw: str, size: str, opts, data: TokenData, tmp: Path, kept: list) -> tuple[dict, int, bool]:
    """All rounds for one framework and model; returns the medians, the state's bytes and whether JAX's
    device copy was timed apart from the call."""
    from hal import store
    cfg = SIZES[size]
    backend = make_trichip(fw, cfg, "fp32")
    gb = opts.global_batch
    micro = opts.micro_batch or gb
    backend.train_step(data.train_batch(0, gb).reshape(gb // micro, micro, opts.seq_len + 1), 1e-3)
    host = backend.get_state().tensors()   # non-zero moments, count 1
    nbytes = sum(v.nbytes for v in host.values())
    meta = {"model": cfg.to_dict(), "writer": backend.describe(),
            "data": {"path": "builtin:python_docs", "seed": 0, "next_step": 1}, "rng": {"seed": 0}}
    times = {k: [] for k in TIMES}
    batch = data.train_batch(0, gb).reshape(gb // micro, micro, opts.seq_len + 1)
    for r in range(opts.ckpt_rounds):
        settle()
        d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"ck-{fw}-{size}-"))
        blocking(r, d, backend, meta, host, times)
        state = parts(r, d, backend, times)
        async_save(fw, d, backend, meta, host, batch, times)
        # a write right after a checkpoint's files were unlinked (what prune does after a save)
        shutil.rmtree(d / "write")
        t = now()
        store.write_tensors(str(d / "write_after_unlink"), state)
        times["write_after_unlink"].append(now() - t)
        discard(d)
        kept.append(d)
    del backend
    gc.collect()
    return {k: med(v) for k, v in times.items()}, nbytes, bool(times["async_copy"])


def ckpt_section(report: Report, opts, step_results: dict, tmp: Path) -> dict:
    rows, rows_split, rows_async, rows_layout, out, kept = [], [], [], [], {}, []
    data = TokenData("builtin:python_docs", opts.seq_len, 0)
    for size in opts.ckpt_models:
        for fw in ("jax", "torch"):
            print(f"[ckpt] {fw} {size} ...", flush=True)
            m, nbytes, copied = measure(fw, size, opts, data, tmp, kept)
            mb = nbytes / 1e6
            save_ratio, sync_ratio = m["raw_save"] / m["save"], m["raw_save_sync"] / m["save"]
            rows.append([fw, size, f1(mb), f0(mb / m["save"]), f0(mb / m["raw_save"]), f2(save_ratio),
                         f0(mb / m["raw_save_sync"]), f2(sync_ratio), "yes" if sync_ratio >= 0.7 else "**no**",
                         f0(mb / m["load"]), f0(mb / m["raw_load"]), f2(m["raw_load"] / m["load"])])
            copy_s = m["async_copy"] if copied else 0.0
            block = m["async_block"] + copy_s
            rows_async.append([fw, size, f3(m["save"]), f3(m["async_block"]),
                               f3(copy_s) if copy_s else "(in the call)", f3(m["step_alone"]),
                               pct(block / m["step_alone"]), "yes" if block < 0.05 * m["step_alone"] else "**no**",
                               f3(m["step_beside"]), f2(m["step_beside"] / m["step_alone"]), f3(m["async_total"]),
                               f3(m["async_commit"]), f3(m["raw_pair"]), f2(m["async_commit"] / m["raw_pair"]),
                               "yes" if m["async_commit"] <= 1.5 * m["raw_pair"] else "**no**"])
            rows_layout.append([fw, size, f3(m["raw_sync_again"]), f3(m["write"]), f2(m["raw_sync_again"] / m["write"]),
                                f3(m["write_ocdbt"]), f2(m["raw_sync_again"] / m["write_ocdbt"]),
                                f3(m["write_default"]), f2(m["raw_sync_again"] / m["write_default"]),
                                f3(m["write_after_unlink"]), f2(m["raw_sync_again"] / m["write_after_unlink"])])
            rows_split.append([fw, size, f3(m["save"]), f3(m["get_state"]), f3(m["digest"]), f3(m["write"]),
                               f3(m["load"]), f3(m["read"]), f3(m["raw_save"]), f3(m["raw_load"])])
            out[fw, size] = m
    tables(report, rows, rows_async, rows_split, rows_layout)
    for d in kept:
        shutil.rmtree(d, ignore_errors=True)
    return out


def tables(report: Report, rows: list, rows_async: list, rows_split: list, rows_layout: list) -> None:
    report.table(
        "4a. Checkpoint save/restore throughput: trichip.checkpoint against raw safetensors",
        ["framework", "model", "state MB", "save MB/s", "raw save MB/s", "save / raw", "raw save + fsync MB/s",
         "save / (raw + fsync)", ">= 0.7", "restore MB/s", "raw read MB/s", "restore / raw"],
        rows,
        "State = params + AdamW mu + nu (float32) + count. trichip save = trainer.checkpoint.save, blocking "
        "(orbax, one uncompressed zarr array per tensor, per-tensor digests, manifest, fsync, rename); restore = "
        "trainer.checkpoint.load (read, verify digests, place on the backend). Raw = safetensors.numpy save_file/"
        "load_file of the same host tensors (no device->host copy, no checksums); 'raw + fsync' adds the fsync "
        "that makes a file survive a power cut, which trichip's save does (tensorstore syncs its writes). Same "
        "local disk, page cache, alternating; each round starts from a synced disk, and what it wrote is truncated "
        "and unlinked only after the section (bench.sections.ckpt.discard). The goal (0.7x) is read against the "
        "durable raw write.")
    report.table(
        "4c. Async save (trainer.async_save=true, the default): what blocks the loop",
        ["framework", "model", "blocking save s", "async: call s", "async: device copy s", "step alone s",
         "blocks (share of a step)", "< 5%", "step beside the write s", "beside / alone", "async save to commit s",
         "commit, nothing beside s", "raw + fsync beside it s", "commit / raw", "<= 1.5"],
        rows_async,
        "call: trainer.checkpoint.PendingSave(background=True), i.e. the state copy (torch: into host buffers every save reuses; "
        "JAX: a jitted copy, dispatched; 'device copy' is how long it then still ran, counted as blocking). The "
        "write, digests and commit then run in a thread while the next step runs: on these 2 "
        "cores they compete with it for CPU (beside / alone); on an accelerator the step runs on the device. "
        "Commit: PendingSave.finish() after that step (manifest, rename), from the call. 'Commit, nothing beside': "
        "the same async save with finish() called right away, from the call to the commit, against a durable "
        "raw write of the same bytes (safetensors + fsync) run right before or after it, alternated, each from a "
        "synced disk (goal <= 1.5x).")
    report.table(
        "4b. Where a save and a restore spend their time (s, each part run alone)",
        ["framework", "model", "save", "get_state (device->host)", "digests (hal.store.digests)",
         "orbax write (hal.store.write_tensors)", "restore", "orbax read (hal.store.read_tensors)",
         "raw save", "raw read"],
        rows_split,
        "A save calls no get_state: backend.snapshot hands the write JAX's arrays (each process its own shards) or "
        "NumPy views of torch's tensors; the column is what a host copy of the state costs. The digests run beside "
        "the write, so the parts overlap the save's total.")
    report.table(
        "4d. Writing the same host tensors three ways (s, alternated in each round; no digests, no manifest)",
        ["framework", "model", "raw + fsync", "hal.store.write_tensors", "raw / it", "orbax OCDBT, no zstd",
         "raw / it", "orbax defaults (OCDBT, zstd)", "raw / it", "write_tensors right after an unlink", "raw / it"],
        rows_layout,
        "hal.store.write_tensors: what a single-process save writes (a zarr array per tensor, no compression, no "
        "copy of host arrays; OCDBT when several processes write). 'orbax OCDBT, no zstd': the format a save by "
        "several processes writes. 'orbax defaults': ocp.PyTreeCheckpointer() as it comes. Each writes state = "
        "backend.get_state().tensors(). Rounds free their files by truncation and unlink them after the section "
        "(bench.sections.ckpt.discard says why); the last column is a write_tensors just after the round's first "
        "one was unlinked, as when prune removes an old checkpoint shortly before a save (not alternated: it runs "
        "last in each round).")
