"""Issue 12 §2: the local supervisor (`make up`) restarts a service that dies, with backoff, logs
the restart, and waits for readiness that means "recovered and consuming" (``/ready``)."""

from __future__ import annotations

import os
import signal
import threading

import httpx

from infra.supervisor import LocalSystem
from tests.conftest import Tenant, wait_until


def test_a_crashed_service_is_restarted_and_consumes_again(system: LocalSystem, new_tenant) -> None:
    t: Tenant = new_tenant()
    # control: the reporter delivers reports before the crash
    assert t.http.post("/commands/add-messages", json={"messages": [t.message("before")]}).json()["queued"] == 1
    t.client.wait_for_report(lambda r: r["id"] == "before")
    assert httpx.get(system.url("reporter") + "/ready", timeout=5).status_code == 200

    logged: list[str] = []
    original_log = system.log
    system.log = lambda msg: (logged.append(msg), original_log(msg))[-1]  # type: ignore[method-assign]
    stop = threading.Event()
    system.supervise(stop, base_s=0.5)
    try:
        old_pid = system.pid("reporter")
        assert old_pid is not None
        os.killpg(old_pid, signal.SIGKILL)  # a crash: not a stop of the supervisor's own
        # mail queued while the reporter is down is reported once it is back
        assert t.http.post("/commands/add-messages", json={"messages": [t.message("during")]}).json()["queued"] == 1
        wait_until(lambda: any("reporter restarted and ready" in m for m in logged), timeout=120,
                   what="the supervisor to restart the reporter")
        assert system.pid("reporter") not in (None, old_pid)
        assert any(m.startswith("RESTART reporter: exited with code -9") for m in logged), logged
        t.client.wait_for_report(lambda r: r["id"] == "during", timeout=90)
    finally:
        stop.set()
        system.log = original_log  # type: ignore[method-assign]


def test_ready_is_not_health(system: LocalSystem) -> None:
    """The stream processors answer /ready only when recovered; both probes are public, the
    Prometheus exposition is not."""
    for name in ("sender", "reporter", "inbound"):
        assert httpx.get(system.url(name) + "/health", timeout=5).status_code == 200
        assert httpx.get(system.url(name) + "/ready", timeout=5).status_code == 200
        assert httpx.get(system.url(name) + "/metrics", timeout=5).status_code == 401
