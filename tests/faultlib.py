"""Fault injection for the tests: a TCP proxy that cuts, delays or stalls what it relays, and helpers that damage
checkpoints, deny reads to root, fill a disk and snapshot directories.

FaultProxy sits between a client (a training process, through AWS_ENDPOINT_URL) and a server (the local S3
server). Its mode applies to every connection, open or new:

    pass     relay bytes both ways
    cut      reset every connection (RST), and each new one as soon as it is accepted
    stall    accept and read, never answer: the client waits for its own timeout
    delay    relay each chunk `seconds` late

`cut_on(pattern, ...)` switches to a fault when a request line (plain HTTP: METHOD PATH HTTP/1.1) matching
the pattern passes through, so an outage can start at a chosen moment of a run (its first tensor download),
and `for_s` ends it again after that many seconds.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

_REQUEST = re.compile(rb"(?m)^(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r?$")
_POLL = 0.05      # how often a relay thread looks at the mode while it waits for bytes


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), the way a dead peer or a firewall ends a connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A TCP relay on 127.0.0.1:<port> to `target` (host, port) whose faults are switched on command."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.mode, self.seconds = "pass", 0.0
        self.requests: list[tuple[float, str, str, str]] = []   # (time, mode it met, method, path)
        self.faulted = 0                  # connections reset or stalled by a fault
        self._trigger = None              # (compiled pattern, mode, seconds, for_s)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._server.settimeout(_POLL)
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- commands -----------------------------------------------------------------------------------
    def set(self, mode: str, seconds: float = 0.0) -> None:
        if mode not in ("pass", "cut", "stall", "delay"):
            raise ValueError(f"unknown proxy mode {mode!r}")
        with self._lock:
            self.mode, self.seconds = mode, seconds

    def cut(self) -> None:
        self.set("cut")

    def stall(self) -> None:
        self.set("stall")

    def delay(self, seconds: float) -> None:
        self.set("delay", seconds)

    def restore(self) -> None:
        self.set("pass")

    def cut_on(self, pattern: str, mode: str = "cut", for_s: float | None = None, seconds: float = 0.0) -> None:
        """Switch to `mode` when a request whose `METHOD PATH` matches `pattern` (a regex) arrives (that request
        meets the fault); back to pass `for_s` seconds later (None: until told)."""
        with self._lock:
            self._trigger = (re.compile(pattern), mode, seconds, for_s)

    def disarm(self) -> None:
        """Forget a trigger that has not fired, and the requests seen so far."""
        with self._lock:
            self._trigger = None
            self.requests.clear()

    def met(self, mode: str) -> list[tuple[str, str]]:
        """The requests that arrived while `mode` was on."""
        return [(method, path) for _, m, method, path in self.requests if m == mode]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._server.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- relaying -----------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.mode == "cut":
            self._count()
            return _reset(client)
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            return _reset(client)
        for s in (client, upstream):
            s.settimeout(_POLL)
        state = {"stalled": False, "dead": False}
        back = threading.Thread(target=self._pump, args=(upstream, client, state, False), daemon=True)
        back.start()
        self._pump(client, upstream, state, True)
        back.join()
        for s in (client, upstream):
            _reset(s) if state["dead"] else s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, outbound: bool) -> None:
        """Relay src -> dst until either side closes or a fault ends the connection. A stalled connection
        stays open and silent until the client gives up (or the proxy closes)."""
        while not self._closed.is_set() and not self._cut(state):
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                state["dead"] = True
                return
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if outbound:
                self._inspect(data)
            if self._cut(state):
                return
            if self.mode == "stall" and not state["stalled"]:
                state["stalled"] = True
                self._count()
            if state["stalled"]:
                continue                     # read and dropped: nothing goes through, nothing comes back
            if self.mode == "delay":
                time.sleep(self.seconds)
            try:
                dst.sendall(data)
            except OSError:
                state["dead"] = True
                return
        state["dead"] = True

    def _cut(self, state: dict) -> bool:
        """Whether this connection is to end now (cut mode, or the other direction ended it)."""
        if self.mode == "cut" and not state["dead"]:
            state["dead"] = True
            self._count()
        return state["dead"]

    def _count(self) -> None:
        with self._lock:
            self.faulted += 1

    def _inspect(self, data: bytes) -> None:
        """Record the request lines in `data`; the first one that matches the trigger switches the mode."""
        for m in _REQUEST.finditer(data):
            method, path = m.group(1).decode(), m.group(2).decode()
            with self._lock:
                trigger = self._trigger
                if trigger is not None and trigger[0].search(f"{method} {path}"):
                    self._trigger = None
                    self.mode, self.seconds = trigger[1], trigger[2]
                    if trigger[3] is not None:
                        threading.Timer(trigger[3], self.restore).start()
                self.requests.append((time.time(), self.mode, method, path))


# -- damage, denial, full disks, snapshots -------------------------------------------------------------

def largest_tensor_file(ckpt: Path) -> Path:
    """The biggest file under a checkpoint's state/: a chunk of its largest tensor (metadata files are small)."""
    return max((p for p in (Path(ckpt) / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(path: Path) -> None:
    """Flip one bit in the middle of a file: same size, different bytes."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))


def tree_digest(root: Path, skip=()) -> dict[str, str]:
    """{relative path: sha256} of every file under root (names in `skip` left out): what "nothing changed" means."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file() and not any(part in skip for part in p.relative_to(root).parts):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]


def root_is_denied(probe_dir: Path) -> str | None:
    """None when a process run under DROP_DAC is refused a chmod-000 directory (as any user would be);
    else why not (no setpriv, or a filesystem or sandbox that lets root read it anyway)."""
    probe = Path(probe_dir) / "denied"
    probe.mkdir(parents=True)
    (probe / "f").write_text("x")
    probe.chmod(0)
    try:
        r = subprocess.run([*DROP_DAC, "cat", str(probe / "f")], capture_output=True, text=True)
    except FileNotFoundError:
        return "setpriv (util-linux) is not installed"
    finally:
        probe.chmod(0o755)
    if r.returncode == 0:
        return "a process without CAP_DAC_OVERRIDE still reads a chmod-000 directory here"
    if "Permission denied" not in r.stderr:
        return f"setpriv cannot drop capabilities here: {r.stderr.strip()[:200]}"
    return None


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` (mount's syntax: 2m, 30m) mounted at path for the block; yields a function that
    resizes it (mount -o remount). Where it cannot be mounted (not root, no mount namespace rights) the test is
    skipped, saying why."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        import pytest
        pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip() or r.returncode}")

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True, capture_output=True)
    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def shrink_to_used(path: Path, resize, tries: int = 50) -> None:
    """Resize a tmpfs (`resize` from tmpfs()) to what it holds now, so it is full from here on. A process
    writing to it meanwhile can make it hold more than was read, and the remount then fails: read and
    resize again."""
    for _ in range(tries):
        st = os.statvfs(path)
        try:
            resize(f"{(st.f_blocks - st.f_bfree) * st.f_frsize // 1024}k")
            return
        except subprocess.CalledProcessError:
            time.sleep(0.01)
    raise AssertionError(f"could not shrink the tmpfs at {path} to what it holds ({tries} tries)")


def wait_for(predicate, timeout: float, what: str, proc=None, every: float = 0.01):
    """Poll until predicate() is truthy (returns it); AssertionError after `timeout` s or when `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


_GATE = '''
import os, time
_target, _reached, _release = (os.environ["TRICHIP_GATE_DIR"], os.environ["TRICHIP_GATE_REACHED"],
                               os.environ["TRICHIP_GATE_RELEASE"])
_mkdir = os.mkdir


def _gated_mkdir(path, *args, **kwargs):
    if os.path.abspath(os.fspath(path)) == _target and not os.path.exists(_reached):
        open(_reached, "w").close()
        while not os.path.exists(_release):
            time.sleep(0.01)
    return _mkdir(path, *args, **kwargs)


os.mkdir = _gated_mkdir
'''


def mkdir_gate(workdir: Path, target: Path) -> tuple[dict, Path, Path]:
    """An environment for a Python process that stops it where it first creates the directory `target`
    (os.mkdir, which pathlib and os.makedirs call) until the file `release` exists; it creates `reached` when
    it gets there. Returns (env, reached, release). A sitecustomize module on PYTHONPATH does it: nothing in
    the program under test changes."""
    hook = Path(workdir) / "mkdir-gate"
    hook.mkdir(parents=True)
    (hook / "sitecustomize.py").write_text(_GATE)
    reached, release = hook / "reached", hook / "release"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TRICHIP_GATE_DIR": str(Path(target).absolute()), "TRICHIP_GATE_REACHED": str(reached),
           "TRICHIP_GATE_RELEASE": str(release)}
    return env, reached, release
