"""Runs the whole Postbus system locally: the Kafka broker (infra/kafka/kafka.sh), the topic bootstrap
and the four services as subprocesses, each in its own process group, logging to ``<state>/logs``.

Used by ``python -m infra.up`` (local run) and by the integration tests (one system per session)::

    with LocalSystem(state_dir, kafka_port=19092, api_port=18000, admin_token="t") as system:
        httpx.get(system.url("api") + "/health")
        system.kill_service("sender")
        system.start_service("sender")
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_SH = REPO_ROOT / "infra" / "kafka" / "kafka.sh"

#: start order matters only for readability of the logs: all four start in parallel
SERVICES = ("metrics", "api", "sender", "reporter", "inbound")



def stop_group(proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` to the process group of ``proc`` (started with ``start_new_session``) and wait;
    SIGKILL the group if it has not exited after ``timeout`` seconds. Returns False when it had to."""
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False


class LocalSystemError(RuntimeError):
    """Base of the errors raised by LocalSystem."""


class ServiceStartError(LocalSystemError):
    def __init__(self, name: str, reason: str, log_tail: str) -> None:
        self.name = name
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(f"service {name!r} {reason}\n--- last lines of its log ---\n{log_tail}")


class BrokerError(LocalSystemError):
    pass


def free_port(pair: bool = False) -> int:
    """A TCP port free on 127.0.0.1 right now; with ``pair=True``, port and port+1 are both free
    (the Kafka broker takes port+1 for its controller)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair:
            return port
        if port < 65535 and _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError("no free port found")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 40, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read()
    except FileNotFoundError:
        return "(no log file)"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:]) if text else "(log is empty)"


@dataclass
class Service:
    name: str
    module: str
    ready_url: str
    proc: subprocess.Popen | None = None
    log_offset: int = 0  # where the current run's output starts in the log file

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalSystem:
    """Broker + topics + the four services, on the given ports, with state under ``state_dir``."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        kafka_port: int = 9092,
        api_port: int = 8000,
        metrics_port: int = 8010,
        sender_metrics_port: int = 9101,
        reporter_metrics_port: int = 9102,
        inbound_metrics_port: int = 9103,
        inbound_smtp_port: int = 2526,
        admin_token: str | None = None,
        env: Mapping[str, str] | None = None,
        services: Iterable[str] = SERVICES,
        ready_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        kafka_heap: str | None = None,
        python: str = sys.executable,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.kafka_port = kafka_port
        self.ports = {
            "api": api_port,
            "metrics": metrics_port,
            "sender": sender_metrics_port,
            "reporter": reporter_metrics_port,
            "inbound": inbound_metrics_port,  # readiness / Prometheus; SMTP on inbound_smtp_port
        }
        self.inbound_smtp_port = inbound_smtp_port
        self.admin_token = admin_token
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.kafka_heap = kafka_heap
        self.python = python
        self.log = log or (lambda msg: print(f"[system] {msg}", file=sys.stderr, flush=True))
        self.logs_dir = self.state_dir / "logs"
        self.pids_dir = self.state_dir / "pids"
        self._lock = threading.RLock()
        self._broker_started = False
        self.services: dict[str, Service] = {}
        for name in services:
            if name not in SERVICES:
                raise ValueError(f"unknown service {name!r} (known: {', '.join(SERVICES)})")
            # readiness without a credential: the stream processors' /ready means "recovered and consuming"
            path = "/ready" if name in ("sender", "reporter", "inbound") else "/health"
            self.services[name] = Service(name, f"services.{name}", f"http://127.0.0.1:{self.ports[name]}{path}")

    # ------------------------------------------------------------------ configuration
    @classmethod
    def with_free_ports(cls, state_dir: str | os.PathLike[str], **kwargs: object) -> LocalSystem:
        """A LocalSystem on ports free right now (for tests, next to a developer's `make up`)."""
        ports = {"kafka_port": free_port(pair=True)}
        for key in ("api_port", "metrics_port", "sender_metrics_port", "reporter_metrics_port",
                    "inbound_metrics_port", "inbound_smtp_port"):
            ports[key] = free_port()
        ports.update(kwargs)  # type: ignore[arg-type]
        return cls(state_dir, **ports)  # type: ignore[arg-type]

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    def url(self, name: str) -> str:
        """Base URL of a service: ``api``/``metrics`` HTTP, ``sender``/``reporter`` Prometheus port."""
        if name == "kafka":
            return self.kafka_bootstrap
        return f"http://127.0.0.1:{self.ports[name]}"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def service_env(self) -> dict[str, str]:
        """The environment every service runs with. Inherited POSTBUS_* variables are dropped so a
        developer's shell cannot leak into tests; pass them through ``env`` when wanted.
        ``POSTBUS_INTERNAL_TOKEN`` (the internal service credential) is the same for all services."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBUS_")}
        env.update(
            PYTHONUNBUFFERED="1",
            POSTBUS_DEV="1",
            POSTBUS_STATE_DIR=str(self.state_dir),
            POSTBUS_KAFKA_BOOTSTRAP=self.kafka_bootstrap,
            POSTBUS_API_HOST="127.0.0.1",
            POSTBUS_API_PORT=str(self.ports["api"]),
            POSTBUS_METRICS_HOST="127.0.0.1",
            POSTBUS_METRICS_PORT=str(self.ports["metrics"]),
            POSTBUS_METRICS_URL=self.url("metrics"),
            POSTBUS_SENDER_METRICS_PORT=str(self.ports["sender"]),
            POSTBUS_REPORTER_METRICS_PORT=str(self.ports["reporter"]),
            POSTBUS_INBOUND_METRICS_PORT=str(self.ports["inbound"]),
            POSTBUS_INBOUND_SMTP_PORT=str(self.inbound_smtp_port),
        )
        if self.admin_token:
            env["POSTBUS_ADMIN_TOKEN"] = self.admin_token
        if "POSTBUS_INTERNAL_TOKEN" not in self.extra_env:
            # one internal service credential for every service (generated once into the state dir)
            from services.common.internal_auth import dev_token

            env["POSTBUS_INTERNAL_TOKEN"] = dev_token(self.state_dir)
        # the repo first on the path, whatever is installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ whole system
    def start(self) -> LocalSystem:
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self.pids_dir.mkdir(exist_ok=True)
        self._kill_leftovers()
        self._ensure_secret_key()
        try:
            self.start_broker()
            self.create_topics()
            self.start_services(list(self.services))
        except BaseException:
            self.stop()
            raise
        self.log(f"system ready in {time.monotonic() - t0:.1f}s")
        return self

    def stop(self) -> None:
        """Services: SIGTERM, then SIGKILL after ``stop_timeout``; then the broker."""
        names = [n for n, s in self.services.items() if s.proc is not None]
        threads = [threading.Thread(target=self.stop_service, args=(n,), daemon=True) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.stop_broker()

    def __enter__(self) -> LocalSystem:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ broker + topics
    def _kafka_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["POSTBUS_STATE"] = str(self.state_dir)
        env["KAFKA_PORT"] = str(self.kafka_port)
        env.pop("KAFKA_CONTROLLER_PORT", None)
        if self.kafka_heap:
            env["KAFKA_HEAP"] = self.kafka_heap
        return env

    def start_broker(self) -> None:
        t0 = time.monotonic()
        self.log(f"starting Kafka on {self.kafka_bootstrap} (log {self.state_dir / 'kafka' / 'logs'})")
        # set first: an interrupt while kafka.sh waits must still stop the broker it launched
        self._broker_started = True
        # own session: a Ctrl-C in the terminal reaches the supervisor only, which stops things in order
        res = subprocess.run(
            ["bash", str(KAFKA_SH), "start"],
            env=self._kafka_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            start_new_session=True,
            timeout=self.ready_timeout + 60,
        )
        if res.returncode != 0:
            raise BrokerError(f"kafka.sh start failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
        self.log(f"Kafka ready in {time.monotonic() - t0:.1f}s")

    def stop_broker(self) -> None:
        if not self._broker_started:
            return
        subprocess.run(
            ["bash", str(KAFKA_SH), "stop"],
            env=self._kafka_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            start_new_session=True,
            check=False,
        )
        self._broker_started = False

    def broker_running(self) -> bool:
        return _port_open(self.kafka_port)

    def create_topics(self) -> None:
        """``python -m services.common.topics`` with the services' environment (idempotent)."""
        res = subprocess.run(
            [self.python, "-m", "services.common.topics"],
            env=self.service_env(),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        with (self.logs_dir / "topics.log").open("a") as fh:
            fh.write(res.stdout + res.stderr)
        if res.returncode != 0:
            raise BrokerError(f"topic bootstrap failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
        self.log(res.stdout.strip() or "topics ready")

    # ------------------------------------------------------------------ services
    def start_services(self, names: list[str]) -> None:
        """Spawn all of them at once (from this thread), then wait for them in parallel."""
        for name in names:
            self._spawn(name)
        errors: list[BaseException] = []
        failed = threading.Event()  # the first failure ends the wait for all (fail fast)

        def wait(n: str) -> None:
            try:
                self.wait_ready(n, cancel=failed)
            except BaseException as exc:
                errors.append(exc)
                failed.set()

        threads = [threading.Thread(target=wait, args=(n,), daemon=True) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def start_service(self, name: str, wait: bool = True) -> None:
        self._spawn(name)
        if wait:
            self.wait_ready(name)

    def _spawn(self, name: str) -> None:
        with self._lock:
            svc = self.services[name]
            if svc.running:
                raise LocalSystemError(f"service {name!r} is already running (pid {svc.proc.pid})")
            if _port_open(self.ports[name]):
                raise ServiceStartError(
                    name, f"cannot start: port {self.ports[name]} is already taken", _tail(self.log_path(name))
                )
            path = self.log_path(name)
            with path.open("ab") as fh:
                fh.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} =====\n".encode())
                svc.log_offset = fh.tell()
                svc.proc = subprocess.Popen(
                    [self.python, "-m", svc.module],
                    cwd=REPO_ROOT,
                    env=self.service_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: signals reach its children too
                )
            (self.pids_dir / f"{name}.pid").write_text(str(svc.proc.pid))
            self.log(f"started {name} (pid {svc.proc.pid}, log {path})")

    def wait_ready(self, name: str, timeout: float | None = None, cancel: threading.Event | None = None) -> None:
        """Poll the service's readiness URL until 2xx; raise ServiceStartError with the tail of its log
        when it exits or the timeout passes."""
        svc = self.services[name]
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        t0 = time.monotonic()
        last_error = "no answer"
        while True:
            if svc.proc is None:
                raise ServiceStartError(name, "was never started", "")
            code = svc.proc.poll()
            if code is not None:
                raise ServiceStartError(
                    name, f"exited with code {code} while starting", _tail(self.log_path(name), start=svc.log_offset)
                )
            try:
                with urllib.request.urlopen(svc.ready_url, timeout=2) as resp:
                    if 200 <= resp.status < 300:
                        self.log(f"{name} ready in {time.monotonic() - t0:.1f}s ({svc.ready_url})")
                        return
                    last_error = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
            except (OSError, urllib.error.URLError) as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    name,
                    f"not ready after {timeout or self.ready_timeout:.0f}s at {svc.ready_url} ({last_error})",
                    _tail(self.log_path(name), start=svc.log_offset),
                )
            if cancel is not None and cancel.wait(0.2):
                return
            if cancel is None:
                time.sleep(0.2)

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Send ``sig`` to the service's process group; SIGKILL it if it has not exited after
        ``timeout`` seconds. Returns the exit code (None if it was not started)."""
        svc = self.services[name]
        proc = svc.proc
        if proc is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        if not stop_group(proc, timeout, sig):
            self.log(f"{name} was still running {timeout:.0f}s after signal {sig}: SIGKILLed")
        # whatever it forked and left behind in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (self.pids_dir / f"{name}.pid").unlink()
        self._wait_port_free(self.ports[name])
        svc.proc = None
        return proc.returncode

    def kill_service(self, name: str) -> int | None:
        """SIGKILL, no grace: a crash."""
        return self.stop_service(name, signal.SIGKILL, timeout=10)

    def restart_service(self, name: str, sig: int = signal.SIGTERM, wait: bool = True) -> None:
        self.stop_service(name, sig)
        self.start_service(name, wait=wait)

    def is_running(self, name: str) -> bool:
        return self.services[name].running

    def pid(self, name: str) -> int | None:
        proc = self.services[name].proc
        return proc.pid if proc else None

    def exited(self) -> dict[str, int]:
        """Services that were started and have exited on their own since: name -> exit code."""
        out = {}
        for name, svc in self.services.items():
            if svc.proc is not None and svc.proc.poll() is not None:
                out[name] = svc.proc.returncode
        return out

    def log_tail(self, name: str, lines: int = 40) -> str:
        return _tail(self.log_path(name), lines)

    # ------------------------------------------------------------------ restarts
    def supervise(self, stop: threading.Event, *, base_s: float = 1.0, cap_s: float = 30.0,
                  stable_s: float = 60.0, poll_s: float = 0.5) -> threading.Thread:
        """Restart, in a daemon thread until ``stop`` is set, every service that exits on its own
        (crash, OOM kill; not a stop_service/kill_service of ours) and the broker when its port
        closes. Exponential backoff per service (``base_s`` doubling to ``cap_s``), reset once a run
        has stayed up ``stable_s``; every restart is logged with the exit code and the attempt."""
        failures: dict[str, int] = {}
        up_since: dict[str, float] = {}
        not_before: dict[str, float] = {}

        def delay(name: str) -> float:
            n = failures.get(name, 0)
            return min(cap_s, base_s * (2 ** max(0, n - 1)))

        def loop() -> None:
            while not stop.wait(poll_s):
                now = time.monotonic()
                if self._broker_started and not self.broker_running():
                    if now >= not_before.get("kafka", 0.0):
                        failures["kafka"] = failures.get("kafka", 0) + 1
                        self.log(f"RESTART kafka: its port is closed (attempt {failures['kafka']})")
                        try:
                            self.start_broker()
                            up_since["kafka"] = time.monotonic()
                        except LocalSystemError as exc:
                            self.log(f"kafka restart failed: {exc}")
                            not_before["kafka"] = time.monotonic() + delay("kafka")
                    continue
                for name, svc in self.services.items():
                    if stop.is_set():
                        return
                    if svc.running:
                        if now - up_since.get(name, now) >= stable_s:
                            failures.pop(name, None)  # a stable run forgives the past
                        continue
                    if svc.proc is None:
                        continue  # never started, or stopped by us on purpose
                    code = svc.proc.returncode
                    if name not in not_before:
                        failures[name] = failures.get(name, 0) + 1
                        not_before[name] = now + delay(name)
                        self.log(f"RESTART {name}: exited with code {code}; restart #{failures[name]} "
                                 f"in {delay(name):.0f}s (log {self.log_path(name)})")
                        continue
                    if now < not_before[name]:
                        continue
                    del not_before[name]
                    with self._lock, contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(svc.proc.pid, signal.SIGKILL)  # whatever the dead run left in its group
                    svc.proc = None
                    try:
                        self._wait_port_free(self.ports[name])
                        self._spawn(name)
                        self.wait_ready(name, cancel=stop)
                        up_since[name] = time.monotonic()
                        self.log(f"{name} restarted and ready")
                    except LocalSystemError as exc:
                        self.log(f"{name} restart failed: {str(exc).splitlines()[0]}")

        thread = threading.Thread(target=loop, name="postbus-supervisor", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ housekeeping
    @staticmethod
    def _wait_port_free(port: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _kill_leftovers(self) -> None:
        """Process groups recorded by a previous supervisor of this state dir that died without
        cleaning up (e.g. SIGKILLed test run)."""
        for pidfile in self.pids_dir.glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except (ValueError, OSError):
                pidfile.unlink(missing_ok=True)
                continue
            if b"services." in cmdline:
                self.log(f"killing leftover {pidfile.stem} (pid {pid}) from an earlier run")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                    time.sleep(0.2)
            pidfile.unlink(missing_ok=True)

    def _ensure_secret_key(self) -> None:
        """Dev mode lets each service generate the secret key in the state dir; create it once here
        so four services starting together do not race for it."""
        if "POSTBUS_SECRET_KEY" in self.extra_env:
            return
        path = self.state_dir / "secret.key"
        if path.exists():
            return
        from cryptography.fernet import Fernet

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(Fernet.generate_key())
