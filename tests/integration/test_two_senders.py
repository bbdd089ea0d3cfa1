"""Two sender instances running together (Faust splits the tenants' partitions between them):
600 messages over 11 tenants are each delivered exactly once, and one account's per-minute limit
holds across both instances.

Its own system (with a 20 s "minute", ``sender_rate_minute_s``, testing only) plus a second sender
process with its own metrics port and state folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from infra.supervisor import LocalSystem, free_port
from tests.conftest import REPO, internal_headers, wait_until
from tests.support.client_app import ClientApp
from tests.support.smtp_server import RecordingSmtpServer

ADMIN = "two-senders-" + uuid.uuid4().hex
MINUTE_S = 20


@pytest.fixture(scope="module")
def smtp() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer() as s:
        yield s


@pytest.fixture(scope="module")
def two_senders() -> Iterator[tuple[LocalSystem, str]]:
    state = REPO / ".test-state" / f"two-senders-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    sys_ = LocalSystem.with_free_ports(state, admin_token=ADMIN, kafka_heap="256m", env={
        "POSTBUS_SENDER_RATE_MINUTE_S": str(MINUTE_S), "POSTBUS_SENDER_MX_LOOKUP": "0",
        "POSTBUS_REPORTER_FLUSH_MS": "200",
        "POSTBUS_ALLOW_PRIVATE_NETWORKS": "1"})  # loopback client apps and SMTP server
    sys_.start()
    port = free_port()
    env = sys_.service_env()
    env.update(POSTBUS_SENDER_METRICS_PORT=str(port), POSTBUS_STATE_DIR=str(state / "sender2"),
               POSTBUS_SECRET_KEY=(state / "secret.key").read_text().strip())
    (state / "sender2").mkdir()
    with (state / "logs" / "sender2.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.sender"], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    second = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(second, internal_headers(sys_)) or proc.poll() is not None, 120,
                   what="second sender")
        assert proc.poll() is None, "the second sender exited"
        # the first one went through the rebalance the second one caused: ready again
        wait_until(lambda: _up(sys_.url("sender"), internal_headers(sys_)), 120, what="first sender ready")
        yield sys_, second
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        sys_.stop()
        if os.environ.get("POSTBUS_KEEP_TEST_STATE") != "1":
            shutil.rmtree(state, ignore_errors=True)


def _up(url: str, headers: dict[str, str]) -> bool:
    """Recovered and consuming (``/ready``), with its Prometheus endpoint answering."""
    try:
        return (httpx.get(f"{url}/ready", timeout=2).status_code == 200
                and httpx.get(f"{url}/metrics", headers=headers, timeout=2).status_code == 200)
    except httpx.HTTPError:
        return False


def _sent_total(url: str, headers: dict[str, str]) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gmp_sent_total{"))


def test_two_senders_never_double_send_and_share_one_rate_limit(two_senders, smtp: RecordingSmtpServer) -> None:
    system, second = two_senders
    clients: list[ClientApp] = []
    tenants: list[tuple[str, httpx.Client]] = []
    try:
        with httpx.Client(base_url=system.url("api"), headers={"X-API-Token": ADMIN}, timeout=30) as admin:
            for i in range(11):
                client = ClientApp(token="tok").start()
                clients.append(client)
                tid = f"two{i}-{uuid.uuid4().hex[:6]}"
                r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                                "client_auth": {"method": "bearer", "token": "tok"}})
                assert r.status_code == 200, r.text
                http = httpx.Client(base_url=system.url("api"), headers={"X-API-Token": r.json()["api_key"]},
                                    timeout=30)
                limit = {"limit_per_minute": 50} if i == 10 else {}
                r = http.post("/account", json={"id": "main", "host": smtp.host, "port": smtp.port,
                                                "use_tls": False, **limit})
                assert r.status_code == 200, r.text
                tenants.append((tid, http))
        # start right after a window boundary so the limited burst begins in a fresh window
        time.sleep(MINUTE_S - time.time() % MINUTE_S + 0.5)
        for tid, http in tenants:
            msgs = [{"id": f"m{j}", "tenant_id": tid, "account_id": "main", "from": f"app@{tid}.test",
                     "to": [f"rcpt{j % 7}@example.test"], "subject": f"two {j}", "body": "x"} for j in range(50)]
            if tid == tenants[10][0]:
                msgs += [{**m, "id": f"m{j + 50}"} for j, m in enumerate(msgs)]  # 100 for the limited one
            r = http.post("/commands/add-messages", json={"messages": msgs})
            assert r.status_code == 200 and r.json()["queued"] == len(msgs), r.text

        def delivered() -> Counter[tuple[str, str]]:
            return Counter((m.message["X-Postbus-Tenant"], m.message["X-Postbus-Message-Id"]) for m in smtp.messages)

        wait_until(lambda: len(delivered()) >= 600, timeout=120, interval=1, what="600 distinct messages")
        time.sleep(3)  # a double send would show up now
        got = delivered()
        assert len(got) == 600 and max(got.values()) == 1, [k for k, n in got.items() if n > 1][:10]

        limited = tenants[10][0]
        windows = Counter(int(m.received_at // MINUTE_S) for m in smtp.messages
                          if m.message["X-Postbus-Tenant"] == limited)
        assert sum(windows.values()) == 100
        assert max(windows.values()) == 50 and all(n <= 50 for n in windows.values()), windows

        # both instances did part of the work
        headers = internal_headers(system)
        first, other = _sent_total(system.url("sender"), headers), _sent_total(second, headers)
        assert first + other >= 600 and first > 0 and other > 0, (first, other)
    finally:
        for c in clients:
            c.stop()
        for _, http in tenants:
            http.close()
