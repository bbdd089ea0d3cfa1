"""A test system with a second sender process (tests/integration/test_two_senders.py,
test_provider_campaigns_two_senders.py): the whole system of its own (tests.conftest.running_system)
plus ``python -m services.sender`` with its own Prometheus port and state folder, in the same
consumer group, so Faust splits the partitions between the two. Both are ready (recovered and
consuming, Prometheus answering) when the context yields; the second one is stopped on the way out
(SIGTERM, SIGKILL after 15 s; a test may have killed it already). Readings of either instance's
Prometheus endpoint: tests/support/prometheus.py."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from infra.supervisor import LocalSystem, free_port, stop_group
from tests.conftest import REPO, fresh_state, internal_headers, running_system, wait_until


@dataclass
class SecondSender:
    proc: subprocess.Popen[bytes]
    url: str  # its Prometheus port (/ready, /metrics)
    log: str  # its log file name in the system's logs folder


@contextlib.contextmanager
def system_with_two_senders(name: str, admin_token: str,
                            env: dict[str, str]) -> Iterator[tuple[LocalSystem, SecondSender]]:
    state = fresh_state(name)
    with running_system(state, admin_token, env) as sys_:
        port = free_port()
        senv = sys_.service_env()
        senv.update(POSTBUS_SENDER_METRICS_PORT=str(port), POSTBUS_STATE_DIR=str(state / "sender2"),
                    POSTBUS_SECRET_KEY=(state / "secret.key").read_text().strip())
        (state / "sender2").mkdir()
        with (state / "logs" / "sender2.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "services.sender"], cwd=REPO, env=senv,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        second = SecondSender(proc, f"http://127.0.0.1:{port}", "sender2.log")
        try:
            headers = internal_headers(sys_)
            wait_until(lambda: sender_up(second.url, headers) or proc.poll() is not None, 120, what="second sender")
            assert proc.poll() is None, "the second sender exited"
            # the first one went through the rebalance the second one caused: ready again
            wait_until(lambda: sender_up(sys_.url("sender"), headers), 120, what="first sender ready")
            yield sys_, second
        finally:
            stop_group(proc, 15.0)  # a test may have killed it already


def sender_up(url: str, headers: dict[str, str]) -> bool:
    """Recovered and consuming (``/ready``), with its Prometheus endpoint answering."""
    try:
        return (httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200
                and httpx.get(f"{url}/metrics", headers=headers, timeout=2).status_code == 200)
    except httpx.HTTPError:
        return False
