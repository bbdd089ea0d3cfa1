"""The system a bench runs against, started the same way by bench/e2e.py and bench/chaos.py: a fresh
state folder of its own (``.state/<name>-<pid>``: two runs never share state), an SMTP sink in its own
process (bench/sinks.py), the whole system on free ports (real Kafka broker, every service;
``infra.supervisor.LocalSystem``), and tenants that each get a real client application (in this
process) and one SMTP account ``sink`` pointing at the sink. Everything is stopped on the way out."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.sinks import make_sink
from infra.supervisor import LocalSystem, free_port, stop_group
from tests.support.client_app import ClientApp

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchSystem:
    system: LocalSystem
    sink: Any  # bench.sinks.FastSink | PostfixSink: .port, .pid
    state: Path
    admin_token: str
    clients: list[tuple[str, ClientApp]] = field(default_factory=list)  # (tenant id, its client app)
    extra_senders: dict[str, tuple[subprocess.Popen[bytes], str]] = field(default_factory=dict)  # name -> (proc, url)

    @property
    def sender_urls(self) -> list[str]:
        """Every sender instance's Prometheus port (the supervisor's, then the extra ones)."""
        return [self.system.url("sender"), *(url for _, url in self.extra_senders.values())]

    def start_extra_sender(self, name: str, timeout_s: float = 180.0) -> int:
        """One more ``python -m services.sender`` in the same consumer group (own state folder and
        Prometheus port): Faust splits the partitions between the instances. Returns its pid once
        it and the first sender are ready again (recovered and consuming after the rebalance)."""
        port = free_port()
        env = self.system.service_env()
        env.update(POSTBUS_SENDER_METRICS_PORT=str(port), POSTBUS_STATE_DIR=str(self.state / name))
        key = self.state / "secret.key"
        if key.exists():
            env["POSTBUS_SECRET_KEY"] = key.read_text().strip()
        (self.state / name).mkdir(exist_ok=True)
        with (self.state / "logs" / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.sender"], cwd=REPO, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        self.extra_senders[name] = (proc, url)
        deadline = time.time() + timeout_s
        while not all(self._ready(u) for u in self.sender_urls):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited (log: {self.state / 'logs' / f'{name}.log'})")
            if time.time() > deadline:
                raise SystemExit(f"the senders were not all ready within {timeout_s:.0f} s")
            time.sleep(0.5)
        return proc.pid

    def _ready(self, url: str) -> bool:
        try:
            return httpx.get(f"{url}/ready", headers=self.internal, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_extra_senders(self) -> None:
        for proc, _ in self.extra_senders.values():
            stop_group(proc, 15.0)

    @property
    def api(self) -> str:
        return self.system.url("api")

    @property
    def internal(self) -> dict[str, str]:
        """The internal service credential (Prometheus ports, the metrics service's routes)."""
        return {"Authorization": f"Bearer {self.system.service_env()['POSTBUS_INTERNAL_TOKEN']}"}

    def add_tenant(self, tid: str, client_token: str) -> str:
        """A tenant reporting to a new client app (bearer ``client_token``) with the account ``sink``;
        returns its API key."""
        client = ClientApp(token=client_token).start()
        self.clients.append((tid, client))
        with httpx.Client(base_url=self.api, headers={"X-API-Token": self.admin_token}, timeout=30) as admin:
            r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                            "client_auth": {"method": "bearer", "token": client_token}})
            if r.status_code != 200:
                raise SystemExit(f"POST /tenant: {r.status_code} {r.text[:500]}")
            key: str = r.json()["api_key"]
            r = admin.post("/account", json={"id": "sink", "tenant_id": tid, "host": "127.0.0.1",
                                             "port": self.sink.port, "use_tls": False})
            if r.status_code != 200:
                raise SystemExit(f"POST /account: {r.status_code} {r.text[:500]}")
        return key


@contextlib.contextmanager
def start_bench_system(name: str, *, admin_token: str, sink: str = "fast", temp_fail_rate: float = 0.0,
                       sink_delay_ms: float = 0.0, env: dict[str, str] | None = None, kafka_heap: str = "512m",
                       keep: bool = False,
                       log: Callable[[str], None] | None = None) -> Iterator[BenchSystem]:
    """Yields the started system. The sink and the client apps are on loopback, so the network policy
    lets the services reach private addresses (``POSTBUS_ALLOW_PRIVATE_NETWORKS=1``) unless ``env``
    says otherwise. ``keep`` keeps the state folder (logs) after the run."""
    state = REPO / ".state" / f"{name}-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    the_sink = make_sink(sink, free_port(), state, temp_fail_rate, sink_delay_ms).start()
    extra: dict[str, Any] = {"log": log} if log is not None else {}
    system = LocalSystem.with_free_ports(state, admin_token=admin_token, kafka_heap=kafka_heap,
                                         env={"POSTBUS_ALLOW_PRIVATE_NETWORKS": "1", **(env or {})}, **extra)
    bench = BenchSystem(system, the_sink, state, admin_token)
    try:
        system.start()
        yield bench
    finally:
        for _, client in bench.clients:
            client.stop()
        bench.stop_extra_senders()
        system.stop()
        the_sink.stop()
        if not keep:
            shutil.rmtree(state, ignore_errors=True)
