"""A second whole system for the adversarial tests, run with the production network policy:
private targets refused (``POSTBUS_ALLOW_PRIVATE_NETWORKS=false``) except the one network an
operator would list for an internal receiver, ``127.0.0.2/32``. Client apps and SMTP servers of the
tests listen there (the positive control: the system can reach them), while every attack aims at the
same listener through 127.0.0.1, ``localhost``, ``[::1]``, mapped forms and so on.

Tests that need no particular network policy use the session ``system`` of ``tests/conftest.py``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from infra.supervisor import LocalSystem
from tests.conftest import ADMIN_TOKEN, Tenant, fresh_state, running_system, tenant_factory
from tests.support.smtp_server import RecordingSmtpServer

ALLOWED_HOST = "127.0.0.2"  # the operator-listed internal network (loopback alias on Linux)


def storage_roots(state: Path) -> str:
    """The operator's named storage roots: one folder per tenant, and one no tenant may choose."""
    return json.dumps({"shared": f"file://{state}/roots/{{tenant_id}}",
                       "vip": {"url": f"file://{state}/roots/vip", "tenants": []}})


@pytest.fixture(scope="session")
def secure_system() -> Iterator[LocalSystem]:
    state = fresh_state("secure")
    with running_system(state, ADMIN_TOKEN, kafka_heap="256m", env={
        "POSTBUS_ALLOW_PRIVATE_NETWORKS": "false",
        "POSTBUS_STORAGE_ROOTS_JSON": storage_roots(state),  # test_storage_roots.py
        "POSTBUS_ALLOWED_PRIVATE_NETWORKS": f"{ALLOWED_HOST}/32",
        "POSTBUS_SENDER_RETRY_BASE_S": "0.5", "POSTBUS_REPORTER_FLUSH_MS": "100",
        "POSTBUS_REPORTER_RETRY_MAX_S": "2",
    }) as sys_:
        yield sys_


@pytest.fixture(scope="session")
def secure_admin(secure_system: LocalSystem) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secure_system.url("api"), headers={"X-API-Token": ADMIN_TOKEN}, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def secure_smtp() -> Iterator[RecordingSmtpServer]:
    with RecordingSmtpServer(host=ALLOWED_HOST) as s:
        yield s


@pytest.fixture
def secure_tenant(secure_system: LocalSystem, secure_admin: httpx.Client,
                  secure_smtp: RecordingSmtpServer) -> Iterator[Callable[..., Tenant]]:
    """A fresh tenant of the secure system whose client app listens on every loopback address (so
    the same listener is reachable as 127.0.0.2, allowed, and as 127.0.0.1/localhost, refused); its
    ``client_base_url`` is the allowed address."""
    with tenant_factory(secure_system, secure_admin, secure_smtp, prefix="s", client_host="0.0.0.0",
                        base_host=ALLOWED_HOST) as make:
        yield make
