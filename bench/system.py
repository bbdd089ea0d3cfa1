"""The system a bench runs against, started the same way by bench/e2e.py and bench/chaos.py: a fresh
state folder of its own (``.state/<name>-<pid>``: two runs never share state), an SMTP sink in its own
process (bench/sinks.py), the whole system on free ports (real Kafka broker, every service;
``infra.supervisor.LocalSystem``), and tenants that each get a real client application (in this
process) and one SMTP account ``sink`` pointing at the sink. Everything is stopped on the way out."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.sinks import make_sink
from infra.supervisor import LocalSystem, free_port
from tests.support.client_app import ClientApp

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchSystem:
    system: LocalSystem
    sink: Any  # bench.sinks.FastSink | PostfixSink: .port, .pid
    state: Path
    admin_token: str
    clients: list[tuple[str, ClientApp]] = field(default_factory=list)  # (tenant id, its client app)

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
                       env: dict[str, str] | None = None, kafka_heap: str = "512m", keep: bool = False,
                       log: Callable[[str], None] | None = None) -> Iterator[BenchSystem]:
    """Yields the started system. The sink and the client apps are on loopback, so the network policy
    lets the services reach private addresses (``POSTBUS_ALLOW_PRIVATE_NETWORKS=1``) unless ``env``
    says otherwise. ``keep`` keeps the state folder (logs) after the run."""
    state = REPO / ".state" / f"{name}-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    the_sink = make_sink(sink, free_port(), state, temp_fail_rate).start()
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
        system.stop()
        the_sink.stop()
        if not keep:
            shutil.rmtree(state, ignore_errors=True)
