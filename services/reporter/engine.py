"""The flusher: one asyncio task per tenant that posts pending reports (or an idle call) to the
tenant's sync endpoint, and acknowledges what a 2xx answer covered.

It knows nothing of Faust: the app feeds it reports (``add``) and gives it an ``ack`` coroutine
that makes an acknowledgement durable. That keeps this logic testable with a plain HTTP server."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from services.common import netpolicy
from services.common.settings import Settings
from services.reporter import metrics
from services.reporter.protocol import Answer, backoff_delay, parse_answer, sync_url
from services.reporter.schedule import SyncState, next_action

log = logging.getLogger("postbus.reporter")

MAX_ANSWER_BYTES = 1024 * 1024  # a sync answer is a small JSON object; more is not read

# (table key, changelog partition) of each acknowledged report
AckFn = Callable[[list[tuple[str, int]]], Awaitable[None]]
TenantLookup = Callable[[str], dict[str, Any] | None]
Decrypt = Callable[[str | None], str | None]


class Reporter:
    def __init__(
        self,
        settings: Settings,
        tenants: TenantLookup,
        ack: AckFn,
        decrypt: Decrypt,
        http: httpx.AsyncClient | None = None,
        net: netpolicy.NetPolicy | None = None,
        interval_s: Callable[[], float | None] | None = None,
    ) -> None:
        self.s = settings
        self._tenants = tenants
        self._ack = ack
        self._decrypt = decrypt
        self._http = http
        self._own_http = http is None
        # sync calls go through the one outbound network policy (tenant-chosen URL: SSRF boundary)
        self._net = net or netpolicy.NetPolicy.from_settings(settings)
        # the idle-call interval: the instance's sync_interval_seconds (PUT /instance), else the setting
        self._interval_s = interval_s or (lambda: None)
        # tenant -> {table key: (report item, changelog partition)}, in arrival order
        self.pending: dict[str, dict[str, tuple[dict[str, Any], int]]] = {}
        self.state: dict[str, SyncState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._warned: set[str] = set()
        self._running = False
        # tenants whose sync state changed since it was last published (STATUS_SYNC, debounced)
        self.dirty: set[str] = set()

    # -- feeding --------------------------------------------------------------------------------

    def add(self, tenant_id: str, key: str, item: dict[str, Any], partition: int) -> None:
        box = self.pending.setdefault(tenant_id, {})
        if key in box:
            return
        box[key] = (item, partition)
        metrics.PENDING.inc()
        st = self._state(tenant_id)
        if st.pending_since is None:
            st.pending_since = time.time()
            st.wake.set()
        elif len(box) == self.s.reporter_batch_size:
            st.wake.set()

    def replace_all(self, entries: list[tuple[str, str, dict[str, Any], int]]) -> None:
        """Rebuild the index (after table recovery): (tenant_id, key, item, partition)."""
        self.pending.clear()
        for st in self.state.values():
            st.pending_since = None
        metrics.PENDING.set(0)
        for tenant_id, key, item, partition in entries:
            self.add(tenant_id, key, item, partition)
        log.info("pending index rebuilt", extra={"reports": len(entries), "tenants": len(self.pending)})

    def drop_partitions(self, partitions: set[int]) -> None:
        """Partitions moved to another worker: their reports are no longer ours to send."""
        for box in self.pending.values():
            for key in [k for k, (_, p) in box.items() if p in partitions]:
                del box[key]
        metrics.PENDING.set(self.pending_count())

    def pending_count(self) -> int:
        return sum(len(b) for b in self.pending.values())

    # -- control --------------------------------------------------------------------------------

    def run_now(self, tenant_id: str | None, override_dnd: bool = False) -> None:
        """run-now: wake one tenant (or all). Only a tenant's own run-now may override its DND and
        force an (empty) call; the admin's wakes every loop and forces a call only where reports are
        pending. An inactive tenant is never forced."""
        targets = [tenant_id] if tenant_id else list(set(self.state) | set(self.pending))
        for tid in targets:
            st = self._state(tid)
            tenant = self._tenants(tid)
            if tenant is not None and tenant.get("active", True) is False:
                st.wake.set()
                continue
            if override_dnd and tenant_id:
                st.dnd_until = 0.0
                self.dirty.add(tid)
            if tenant_id or self.pending.get(tid):
                st.force = True
            st.wake.set()

    def on_tenant_change(self, tenant_id: str, tenant: dict[str, Any] | None) -> None:
        self._warned.discard(tenant_id)
        if tenant is not None or tenant_id in self.state:
            self._state(tenant_id).wake.set()

    def restore(self, tenant_id: str, last_sync_ts: float | None, dnd_until: float | None) -> None:
        """Seed a tenant's state from its last published status (a restart keeps DND and the
        interval instead of calling every tenant at once)."""
        st = self._state(tenant_id)
        st.last_sync_ts = max(st.last_sync_ts, last_sync_ts or 0.0)
        st.dnd_until = max(st.dnd_until, dnd_until or 0.0)
        st.wake.set()

    def interval_s(self) -> float:
        value = self._interval_s()
        return float(value) if value else self.s.reporter_sync_interval_s

    def on_interval_change(self) -> None:
        """A new interval applies at once: every loop re-decides."""
        for st in self.state.values():
            st.wake.set()

    def take_dirty(self) -> list[str]:
        out, self.dirty = sorted(self.dirty), set()
        return out

    def sync_status(self) -> dict[str, dict[str, object]]:
        now = time.time()
        out = {}
        for tid, st in self.state.items():
            row = st.status(now, self.interval_s())
            row["pending"] = len(self.pending.get(tid, ()))
            out[tid] = row
        return out

    async def start(self) -> None:
        if self._http is None:
            self._http = netpolicy.client(
                self.s.reporter_http_timeout_s,
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
            )
        self._running = True
        for tid in list(self.state):
            self._ensure_task(tid)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- per-tenant loop ------------------------------------------------------------------------

    def _state(self, tenant_id: str) -> SyncState:
        st = self.state.get(tenant_id)
        if st is None:
            st = self.state[tenant_id] = SyncState()
        self._ensure_task(tenant_id)
        return st

    def _ensure_task(self, tenant_id: str) -> None:
        if not self._running:
            return
        t = self._tasks.get(tenant_id)
        if t is None or t.done():
            self._tasks[tenant_id] = asyncio.get_running_loop().create_task(
                self._tenant_loop(tenant_id), name=f"reporter:{tenant_id}"
            )

    async def _tenant_loop(self, tenant_id: str) -> None:
        st = self.state[tenant_id]
        while True:
            st.wake.clear()  # before deciding: a wake during the decision is not lost
            try:
                action, delay = self._decide(tenant_id, st)
                if action is None:
                    try:
                        await asyncio.wait_for(st.wake.wait(), timeout=delay)
                    except TimeoutError:
                        pass
                    continue
                await self._sync_once(tenant_id, st, with_events=action == "events")
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not silently stop one tenant's reporting forever
                log.exception("reporter loop error", extra={"tenant_id": tenant_id})
                st.failures += 1
                st.retry_at = time.time() + backoff_delay(st.failures, cap_s=self.s.reporter_retry_max_s)

    def _decide(self, tenant_id: str, st: SyncState) -> tuple[str | None, float | None]:
        tenant = self._tenants(tenant_id)
        url = sync_url(tenant, self.s.client_sync_path_default) if tenant else None
        pending = len(self.pending.get(tenant_id, ()))
        if pending and st.pending_since is None:  # e.g. a call that took them all failed: linger from now
            st.pending_since = time.time()
        if url is None and pending and tenant_id not in self._warned:
            self._warned.add(tenant_id)
            log.warning(
                "reports kept: tenant unknown or without client_base_url",
                extra={"tenant_id": tenant_id, "pending": pending, "known": tenant is not None},
            )
        return next_action(
            st,
            time.time(),
            pending=pending,
            has_endpoint=url is not None,
            active=bool(tenant and tenant.get("active", True)),
            batch_size=self.s.reporter_batch_size,
            linger_s=self.s.reporter_flush_ms / 1000.0,
            interval_s=self.interval_s(),
        )

    def _auth(self, tenant: dict[str, Any]) -> tuple[dict[str, str], httpx.Auth | None]:
        method = (tenant.get("client_auth_method") or "none").lower()
        if method == "bearer":
            return {"Authorization": f"Bearer {self._decrypt(tenant.get('client_auth_secret_enc')) or ''}"}, None
        if method == "basic":
            user = tenant.get("client_auth_user") or ""
            return {}, httpx.BasicAuth(user, self._decrypt(tenant.get("client_auth_secret_enc")) or "")
        return {}, None

    async def _sync_once(self, tenant_id: str, st: SyncState, *, with_events: bool) -> None:
        assert self._http is not None
        tenant = self._tenants(tenant_id) or {}
        url = sync_url(tenant, self.s.client_sync_path_default)
        if url is None:
            return
        box = self.pending.get(tenant_id, {})
        batch: list[tuple[str, dict[str, Any], int]] = []
        if with_events:
            for key, (item, part) in box.items():
                batch.append((key, item, part))
                if len(batch) >= self.s.reporter_batch_size:
                    break
        lingered_since = st.pending_since
        if batch and len(batch) == len(box):
            # this call takes every pending report: one arriving meanwhile starts a new linger (else
            # every report arriving during a call is sent at once after it, in ever smaller calls:
            # each one an HTTP call and a Kafka flush)
            st.pending_since = None
        st.force = st.recall = False
        t0 = time.perf_counter()
        try:
            headers, auth = self._auth(tenant)
            # no redirects: a callback answers itself; a 3xx is a non-acknowledgement like any other
            async with self._net.stream(self._http, "POST", url, headers=headers, auth=auth, follow=False,
                                        json_body={"delivery_report": [item for _, item, _ in batch]}) as resp:
                body = await _read_limited(resp, MAX_ANSWER_BYTES)
            answer = parse_answer(resp.status_code, body)
        except netpolicy.Refused as exc:
            answer = Answer(False, "blocked")
            log.warning("sync call refused by the network policy",
                        extra={"tenant_id": tenant_id, "reason": str(exc)})
        except netpolicy.Unreachable as exc:
            answer = Answer(False, "timeout" if exc.timeout else "conn_error")
            log.debug("sync call failed", extra={"tenant_id": tenant_id, "error": str(exc)})
        except httpx.HTTPError as exc:
            answer = Answer(False, "conn_error")
            log.debug("sync call failed", extra={"tenant_id": tenant_id, "error": repr(exc)})
        except ValueError as exc:  # client secret cannot be decrypted
            answer = Answer(False, "auth_config")
            log.error("client auth unusable", extra={"tenant_id": tenant_id, "error": str(exc)})
        metrics.SYNC_SECONDS.observe(time.perf_counter() - t0)
        metrics.SYNC_CALLS.labels(tenant_id, answer.outcome).inc()
        st.last_outcome = answer.outcome
        self.dirty.add(tenant_id)
        now = time.time()
        if not answer.acked:
            if lingered_since is not None:  # the batch is still pending, since then
                st.pending_since = min(lingered_since, st.pending_since or lingered_since)
            st.failures += 1
            delay = backoff_delay(st.failures, cap_s=self.s.reporter_retry_max_s)
            st.retry_at = now + delay
            log.warning(
                "sync call not acknowledged, retrying later",
                extra={"tenant_id": tenant_id, "outcome": answer.outcome, "reports": len(batch),
                       "retry_in_s": round(delay, 2), "failures": st.failures},
            )
            return
        if batch:
            await self._ack([(key, part) for key, _, part in batch])
            box = self.pending.get(tenant_id, {})  # the index may have been rebuilt meanwhile
            for key, _, _ in batch:
                box.pop(key, None)
            metrics.PENDING.set(self.pending_count())
            metrics.REPORTS_SENT.labels(tenant_id).inc(len(batch))
        if answer.errors or answer.not_found:
            log.info(
                "client could not match some reports",
                extra={"tenant_id": tenant_id, "error_ids": answer.errors[:20],
                       "not_found": answer.not_found[:20]},
            )
        st.failures = 0
        st.retry_at = 0.0
        st.last_sync_ts = now
        st.recall = answer.queued > 0
        if answer.next_sync_after is not None:
            st.dnd_until = answer.next_sync_after
        if not self.pending.get(tenant_id):
            st.pending_since = None


async def _read_limited(resp: httpx.Response, limit: int) -> bytes:
    """The answer body, at most ``limit`` bytes (a larger one reads as a bad body, never fills memory)."""
    chunks, size = [], 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return b""
        chunks.append(chunk)
    return b"".join(chunks)
