"""The SMTP peers of the benchmark, each in its own process, with a way to learn what arrived.

- ``fast``: bench/fast_sink.py (Python, asyncio); it appends ``<message id> <tenant> <epoch s>`` per
  accepted message to a log file (stamped on receipt, flushed every 200 ms). Can greylist
  (``--temp-fail-rate``).
- ``smtp-sink``: Postfix's C test server ``smtp-sink`` (Debian package ``postfix``; only this binary is
  used, no mail system is configured or started). It stores nothing by itself: it runs with ``-D``, a
  multi-message dump file that it appends each finished transaction to (written when the DATA
  transaction ends), and ``-S`` puts a separator line before each one. A thread of the harness tails
  that file every ``poll_s`` (20 ms) and stamps each message with the time it saw it there, reading the
  ``X-Postbus-Message-Id`` and ``X-Postbus-Tenant`` headers the sender adds.

Both give ``poll() -> [(message_id, tenant_id, arrival_epoch_s), ...]``, the arrivals since the last
call, and ``pid`` for the CPU accounting.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
Arrival = tuple[str, str, float]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on 127.0.0.1:{port} after {timeout:.0f}s")


class FastSink:
    name = "fast"

    def __init__(self, port: int, state: Path, temp_fail_rate: float = 0.0, reply_delay_ms: float = 0.0) -> None:
        self.port = port
        self.log = state / "sink.log"
        self.temp_fail_rate = temp_fail_rate
        self.reply_delay_ms = reply_delay_ms
        self.proc: subprocess.Popen | None = None
        self._offset = 0
        self._partial = b""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> FastSink:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "fast_sink.py"), "--port", str(self.port), "--out", str(self.log),
             "--temp-fail-rate", str(self.temp_fail_rate), "--reply-delay-ms", str(self.reply_delay_ms)],
            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port, self.proc, "fast_sink.py")
        return self

    def poll(self) -> list[Arrival]:
        if not self.log.exists():
            return []
        with self.log.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next poll
        out = []
        for line in lines:
            parts = line.decode(errors="replace").split(" ")
            if len(parts) == 3:
                out.append((parts[0], parts[1], float(parts[2])))
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SEPARATOR = b"\n#POSTBUS-SINK#\n"
# a header counts once its line is complete (a newline follows): a read may end inside the value
_MID = re.compile(rb"^x-postbus-message-id:[ \t]*(\S+)[ \t]*\r?\n", re.I | re.M)
_TEN = re.compile(rb"^x-postbus-tenant:[ \t]*(\S+)[ \t]*\r?\n", re.I | re.M)


def smtp_sink_binary() -> str | None:
    return shutil.which("smtp-sink") or next(
        (p for p in ("/usr/sbin/smtp-sink", "/usr/bin/smtp-sink") if os.access(p, os.X_OK)), None)


class PostfixSink:
    """Postfix ``smtp-sink`` on 127.0.0.1:port with a dump file tailed by a thread."""

    name = "smtp-sink"

    def __init__(self, port: int, poll_s: float = 0.02, backlog: int = 512) -> None:
        self.port = port
        self.poll_s = poll_s
        self.backlog = backlog
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self._arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bytes_read = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> PostfixSink:
        binary = smtp_sink_binary()
        if binary is None:
            raise RuntimeError("smtp-sink not found: install the Debian package postfix (`make bench` does, "
                               "with no mail system configured)")
        # smtp-sink refuses to run as root without -u; the dump file is then written as that user.
        # On tmpfs: smtp-sink writes each transaction through a file it creates and unlinks, which on a
        # disk file system (ext4) costs it ~0.6 ms of CPU per message and slows its answers; on tmpfs
        # the dump costs next to nothing (measured: 2,000 messages 0.10 s CPU vs 0.07 s without -D)
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="postbus-smtp-sink-", dir=shm))
        self.dir.chmod(0o777)
        dump = self.dir / "dump"  # no '%': the strftime template is a fixed name
        cmd = [binary]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-S", SEPARATOR.decode().replace("\n", "\\n"), "-D", str(dump),
                f"127.0.0.1:{self.port}", str(self.backlog)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        _wait_port(self.port, self.proc, "smtp-sink")
        self._thread = threading.Thread(target=self._tail, args=(dump,), name="smtp-sink-tail", daemon=True)
        self._thread.start()
        return self

    def _tail(self, dump: Path) -> None:
        fh = None
        buf = b""
        recorded = False  # the current (last, possibly unfinished) transaction is already counted
        while True:
            stopping = self._stop.is_set()
            if fh is None:
                with contextlib.suppress(FileNotFoundError):
                    fh = dump.open("rb")
            data = fh.read() if fh is not None else b""
            if data:
                now = time.time()
                self.bytes_read += len(data)
                buf += data
                parts = buf.split(SEPARATOR)
                found: list[Arrival] = []
                for i, part in enumerate(parts):
                    if not recorded:
                        m, t = _MID.search(part), _TEN.search(part)
                        if m and t:
                            found.append((m.group(1).decode(errors="replace"), t.group(1).decode(errors="replace"),
                                          now))
                            recorded = True
                    if i < len(parts) - 1:
                        recorded = False  # a separator follows: the next part is a new transaction
                buf = parts[-1]
                if found:
                    with self._lock:
                        self._arrivals.extend(found)
            elif stopping:
                break
            else:
                self._stop.wait(self.poll_s)
        if fh is not None:
            fh.close()

    def poll(self) -> list[Arrival]:
        with self._lock:
            out, self._arrivals = self._arrivals, []
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def make_sink(kind: str, port: int, state: Path, temp_fail_rate: float = 0.0,
              reply_delay_ms: float = 0.0) -> FastSink | PostfixSink:
    if kind == "fast":
        return FastSink(port, state, temp_fail_rate, reply_delay_ms)
    if kind == "smtp-sink":
        if temp_fail_rate or reply_delay_ms:
            raise SystemExit("--temp-fail-rate and --sink-delay-ms need --sink fast (smtp-sink accepts "
                             "everything at once)")
        return PostfixSink(port)
    raise SystemExit(f"unknown sink {kind!r}")
