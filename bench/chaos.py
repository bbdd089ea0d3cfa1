"""Chaos bench: SIGKILL every process of the system in turn while messages flow, and check that
nothing accepted is lost, duplicates stay within the documented in-flight bound, and the analytics
(ClickHouse) and the outbound domain ledger count exactly what reached the SMTP sink.

Starts its own system (real Kafka broker, all services, fresh state, free ports) under the
restarting supervisor of ``make up`` (``LocalSystem.supervise``), the fast SMTP sink in its own
process, a DNS server on loopback (so each tenant verifies its own sending domain and every message
is counted by the domain ledger) and one real client application per tenant. A feeder sends the
messages through the REST API at ``--rate`` msg/s, retrying a call that failed (the API killed, the
broker down) with the same ids, as a real client would. The kill sequence, one step per target:

    api, sender, reporter, metrics, inbound, broker, all (the broker and every service at once)

Each step lets the feeder put half a segment (messages / steps) through, SIGKILLs the target's
process group (the broker: its JVM), waits until the supervisor has restarted it and it is ready
again (the broker is restarted by this bench after ``--broker-down-s``, 8 s), and goes on while
the rest of the segment flows. Then it waits until every accepted message is at the sink and
reported to its client, and until the analytics and the ledgers have caught up, and reports:

- accepted (the API answered 200), delivered (distinct at the sink), missing, duplicate deliveries
  against the bound (per sender kill: tenants x SMTP workers per account x (1 + unflushed outcomes
  per worker), docs/architecture.md "Delivery guarantees")
- missing / duplicate delivery reports at the client applications
- ClickHouse ``sent`` per tenant (the metrics service's ``/internal/counters``) vs the sink: exact
- each tenant's domain ledger (``outbound_sent_today`` / ``outbound_sent_month``) vs the sink: exact
- a last sender SIGKILL once everything is delivered and counted: nothing may be sent again (every
  outcome is durable by then; a final state missing from the recovered table would resend its mail)

    python bench/chaos.py                     # 20,000 messages, the full kill sequence
    python bench/chaos.py -n 5000 --rate 100  # scaled down (a loaded machine), same kill sequence
    make chaos                                # the first one

Exit code 0 only when the run is clean (0 missing, duplicates within the bound, exact analytics and
ledgers). The result is printed and written to bench/results/chaos-<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
from dnslib.server import DNSLogger, DNSServer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import procstat  # noqa: E402
from bench.e2e import PYTHON_SERVICES, Key, Tracker, make_body, message, uptime  # noqa: E402
from bench.system import BenchSystem, start_bench_system  # noqa: E402
from infra.supervisor import KAFKA_SH, LocalSystem, free_port  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from tests.integration.test_domains import _Zone  # noqa: E402

STEPS = (*PYTHON_SERVICES, "broker", "all")
CONNECTIONS_PER_ACCOUNT = 8  # POSTBUS_SENDER_CONNECTIONS_PER_ACCOUNT default (the accounts set none)
UNFLUSHED_PER_WORKER = Settings.model_fields["sender_unflushed_per_worker"].default  # the default


@contextlib.contextmanager
def dns_server() -> Iterator[tuple[int, _Zone]]:
    """The DNS zone of tests/integration/test_domains.py on loopback, without its per-query log."""
    zone = _Zone()
    port = free_port()
    server = DNSServer(zone, port=port, address="127.0.0.1", tcp=False,
                       logger=DNSLogger(logf=lambda _s: None))
    server.start_thread()
    try:
        yield port, zone
    finally:
        server.stop()


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Feeder:
    """Sends ``total`` messages over the tenants at ``rate`` msg/s in calls of ``batch``, never past
    ``allowed`` (raised by the kill loop, a segment per step); a failed call is retried with the same
    messages until the API answers 200 (ids answered ``already_sent`` were accepted by an earlier try
    whose answer was lost)."""

    def __init__(self, api: str, tenants: list[tuple[str, str, str]], total: int, rate: float, batch: int,
                 body: str) -> None:
        self.api = api
        self.tenants = tenants  # (tenant id, api key, sending domain)
        self.total = total
        self.rate = rate
        self.batch = batch
        self.body = body
        self.allowed = 0
        self.accepted: dict[Key, float] = {}
        self.retries = 0
        self.errors: Counter[str] = Counter()
        self.refused: list[str] = []
        self.done = threading.Event()
        self.stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    async def _call(self, client: httpx.AsyncClient, tid: str, key: str, msgs: list[dict]) -> None:
        while not self.stop.is_set():
            try:
                r = await client.post("/commands/add-messages", json={"messages": msgs},
                                      headers={"X-API-Token": key})
                if r.status_code == 200:
                    body = r.json()
                    other = [x for x in body.get("rejected", []) if x.get("code") != "already_sent"]
                    if other:  # a refusal that is not a retry's echo: reported, those ids are not accepted
                        self.refused.extend(f"{tid}/{x.get('id')}: {x.get('reason')}" for x in other)
                    bad = {x.get("id") for x in other}
                    now = time.time()
                    for m in msgs:
                        if m["id"] not in bad:
                            self.accepted[(tid, m["id"])] = now
                    return
                self.errors[f"HTTP {r.status_code} {r.text[:80]}"] += 1
            except httpx.HTTPError as exc:
                self.errors[type(exc).__name__] += 1
            self.retries += 1
            await asyncio.sleep(0.5)

    async def _run(self) -> None:
        sent = 0
        n = 0
        inflight: set[asyncio.Task] = set()
        slots = asyncio.Semaphore(16)
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(base_url=self.api, timeout=30, limits=limits) as client:
            t0 = time.monotonic()
            while sent < self.total and not self.stop.is_set():
                if sent >= self.allowed:
                    await asyncio.sleep(0.05)
                    t0 = time.monotonic() - sent / self.rate  # no catch-up burst after a hold
                    continue
                due = t0 + sent / self.rate - time.monotonic()
                if due > 0:
                    await asyncio.sleep(due)
                size = min(self.batch, self.total - sent, self.allowed - sent)
                tid, key, dom = self.tenants[n % len(self.tenants)]
                msgs = [{**message(tid, f"c{sent + i}", self.body), "from": f"chaos@{dom}"} for i in range(size)]
                n += 1
                sent += size
                await slots.acquire()  # at most 16 calls open: a long outage does not pile up calls
                task = asyncio.create_task(self._call(client, tid, key, msgs))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                task.add_done_callback(lambda _t: slots.release())
            if inflight:
                await asyncio.gather(*inflight)
        self.done.set()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError):
        return False


def broker_pid(system: LocalSystem) -> int:
    return int((system.state_dir / "kafka" / "kafka.pid").read_text().strip())


def kill(system: LocalSystem, targets: list[str]) -> dict[str, int]:
    """SIGKILL each target's whole process group (a crash: the supervisor sees it exit on its own);
    the broker's JVM, with the supervisor's broker watch off (this bench restarts it)."""
    killed: dict[str, int] = {}
    if "broker" in targets:
        system._broker_started = False  # the supervisor leaves the broker to us until start_broker()
        pid = broker_pid(system)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed["broker"] = pid
    for name in targets:
        if name == "broker":
            continue
        pid = system.pid(name)
        assert pid is not None, f"{name} is not running"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        killed[name] = pid
    deadline = time.monotonic() + 10
    for name, pid in killed.items():  # every process of the group is gone
        while time.monotonic() < deadline and (procstat.process_group_members(pid) if name != "broker"
                                               else Path(f"/proc/{pid}").exists()):
            time.sleep(0.05)
    return killed


def restart_broker(system: LocalSystem) -> None:
    """kafka.sh start, as LocalSystem.start_broker does, with the supervisor's broker watch still off
    while the broker starts (it would see the port closed and start it again and again), on after."""
    log("restarting the broker")
    t0 = time.monotonic()
    # a loaded machine starts the JVM slowly: a longer wait than kafka.sh's 90 s default
    env = {**system._kafka_env(), "KAFKA_START_TIMEOUT": "300"}
    res = subprocess.run(["bash", str(KAFKA_SH), "start"], env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, start_new_session=True, timeout=400)
    system._broker_started = True
    if res.returncode != 0:  # the JVM may still come up: wait_recovered waits for its port
        log(f"  kafka.sh start: exit {res.returncode}: {(res.stdout + res.stderr).strip()[-300:]}")
        return
    log(f"  broker ready in {time.monotonic() - t0:.1f}s")


def wait_recovered(system: LocalSystem, killed: dict[str, int], timeout: float) -> float:
    """Until every killed service runs again under a new pid and answers its readiness URL (the
    stream processors' /ready: recovered and consuming), and the broker answers."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        pending = []
        if "broker" in killed and not system.broker_running():
            pending.append("broker")
        for name, old in killed.items():
            if name == "broker":
                continue
            pid = system.pid(name)
            if pid is None or pid == old or not system.is_running(name) or not ready(system.services[name].ready_url):
                pending.append(name)
        if not pending:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise SystemExit(f"not recovered after {timeout:.0f}s: {pending}")
        time.sleep(0.25)


def counts_at_sink(tracker: Tracker, tenants: list[str]) -> dict[str, int]:
    out = dict.fromkeys(tenants, 0)
    for tid, _ in tracker.arrivals:
        if tid in out:
            out[tid] += 1
    return out


def clickhouse_sent(metrics_url: str, headers: dict[str, str]) -> dict[str, int]:
    body = httpx.get(f"{metrics_url}/internal/counters", headers=headers, timeout=30).json()
    out: dict[str, int] = {}
    for row in body["accounts"]:
        out[row["tenant_id"]] = out.get(row["tenant_id"], 0) + int(row["sent"])
    return out


def ledger_counts(api: str, tenants: list[tuple[str, str, str]]) -> dict[str, tuple[int, int]]:
    out = {}
    with httpx.Client(base_url=api, timeout=30) as c:
        for tid, key, dom in tenants:
            r = c.get(f"/domains/{dom}/outbound", headers={"X-API-Token": key})
            r.raise_for_status()
            out[tid] = (int(r.json()["outbound_sent_today"]), int(r.json()["outbound_sent_month"]))
    return out


def wait_equal(what: str, read, expected, timeout: float):  # type: ignore[no-untyped-def]
    """Polls ``read()`` until it equals ``expected`` (the projections catch up after the sink);
    returns the last value read."""
    deadline = time.monotonic() + timeout
    got = None
    while True:
        try:
            got = read()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            got = f"error: {exc}"
        if got == expected or time.monotonic() > deadline:
            if got != expected:
                log(f"{what}: expected {expected}, got {got}")
            return got
        time.sleep(1.0)


def setup_tenants(bench: BenchSystem, zone: _Zone, n: int) -> list[tuple[str, str, str]]:
    """``n`` tenants (bench/system.py), each with its own sending domain verified in ``zone``."""
    tenants: list[tuple[str, str, str]] = []
    for i in range(n):
        tid = f"chaos{i}"
        key = bench.add_tenant(tid, f"tok{i}")
        dom = f"{tid}-{os.getpid()}.example.test"
        with httpx.Client(base_url=bench.api, headers={"X-API-Token": key}, timeout=30) as t:
            deadline = time.monotonic() + 60
            while t.put(f"/domains/{dom}/outbound", json={}).status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit(f"cannot register {dom}")
                time.sleep(0.5)
            r = t.post(f"/domains/{dom}/ses-verify")
            if r.status_code != 200:
                raise SystemExit(f"ses-verify {dom}: {r.status_code} {r.text[:300]}")
            with zone.lock:
                for rec in r.json()["dns_records"]:
                    zone.txt[rec["name"]] = [*zone.txt.get(rec["name"], []), rec["value"]]
            r = t.get(f"/domains/{dom}/ses-status")
            if r.status_code != 200 or r.json().get("ses_verified") is not True:
                raise SystemExit(f"ses-status {dom}: {r.status_code} {r.text[:300]}")
        tenants.append((tid, key, dom))
    return tenants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("-t", "--tenants", type=int, default=4)
    ap.add_argument("--rate", type=float, default=200.0, help="messages offered per second by the feeder")
    ap.add_argument("--batch", type=int, default=50, help="messages per add-messages call")
    ap.add_argument("--body-bytes", type=int, default=512)
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"kill sequence, comma-separated among {', '.join(STEPS)}")
    ap.add_argument("--broker-down-s", type=float, default=8.0, help="how long the broker stays down")
    ap.add_argument("--recover-timeout", type=float, default=240.0)
    ap.add_argument("--timeout", type=float, default=1200.0, help="for delivery after the last kill")
    ap.add_argument("--settle-timeout", type=float, default=300.0,
                    help="for ClickHouse and the domain ledgers to match the sink after the last delivery")
    ap.add_argument("--no-final-sender-kill", dest="final_sender_kill", action="store_false",
                    help="skip the last check (a sender SIGKILL once everything is delivered must resend nothing)")
    ap.add_argument("--final-wait-s", type=float, default=30.0, help="how long the final check watches the sink")
    ap.add_argument("--seed", type=int, default=None, help="kill moments are jittered; fixed with a seed")
    ap.add_argument("--kafka-heap", default="512m")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the state folder")
    args = ap.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := [s for s in steps if s not in STEPS]:
        raise SystemExit(f"unknown steps {unknown} (known: {', '.join(STEPS)})")
    rnd = random.Random(args.seed)

    log(f"uptime: {uptime()}")
    stop = threading.Event()
    feeder: Feeder | None = None
    with dns_server() as (dns_port, zone):
        env = {"POSTBUS_ALLOW_PRIVATE_NETWORKS": "1", "POSTBUS_DNS_RESOLVERS": f"127.0.0.1:{dns_port}",
               "POSTBUS_DNS_TIMEOUT_S": "2"}
        restarts: list[str] = []  # the supervisor's RESTART lines

        def system_log(msg: str) -> None:
            if msg.startswith("RESTART"):
                restarts.append(msg.split(" (log ")[0])
            log(f"[system] {msg}")

        stop_system = contextlib.ExitStack()  # closed last in the finally below: clients, system, sink, state
        bench = stop_system.enter_context(start_bench_system("chaos", admin_token="chaos-admin", env=env,
                                                             kafka_heap=args.kafka_heap, keep=args.keep,
                                                             log=system_log))
        system = bench.system
        try:
            system.supervise(stop)
            api = bench.api
            internal = bench.internal
            tenants = setup_tenants(bench, zone, args.tenants)
            tracker = Tracker(bench.sink, bench.clients)
            feeder = Feeder(api, tenants, args.messages, args.rate, args.batch, make_body(args.body_bytes)).start()
            segment = args.messages // (len(steps) + 1)
            t_start = time.time()
            kills: list[dict] = []
            for i, step in enumerate(steps):
                feeder.allowed = segment * (i + 1)
                # half a segment (jittered) through the API, then the kill while the rest flows
                target = segment * i + int(segment * rnd.uniform(0.3, 0.7))
                while len(feeder.accepted) < target and not feeder.done.is_set():
                    tracker.poll()
                    time.sleep(0.1)
                tracker.poll()
                targets = ["broker", *PYTHON_SERVICES] if step == "all" else [step]
                at_sink = len(tracker.first_arrival)
                log(f"step {i + 1}/{len(steps)}: SIGKILL {', '.join(targets)} "
                    f"(accepted {len(feeder.accepted)}, at sink {at_sink})")
                t_kill = time.monotonic()
                killed = kill(system, targets)
                if "broker" in killed:
                    time.sleep(args.broker_down_s)
                    restart_broker(system)
                recovered = wait_recovered(system, killed, args.recover_timeout)
                down = time.monotonic() - t_kill
                tracker.poll()
                log(f"  recovered in {down:.1f}s (at sink {len(tracker.first_arrival)})")
                kills.append({"step": step, "targets": targets, "accepted_before": len(feeder.accepted),
                              "at_sink_before": at_sink, "recovered_s": round(down, 1),
                              "wait_ready_s": round(recovered, 1)})
            feeder.allowed = args.messages
            feeder.join()
            t_accepted = time.time()
            keys = set(feeder.accepted)
            log(f"feeder done: {len(keys)} accepted ({feeder.retries} retried calls) in {t_accepted - t_start:.0f}s")

            deadline = time.monotonic() + args.timeout
            last = 0.0
            while True:
                tracker.poll()
                delivered, reported = tracker.done(keys)
                if delivered >= len(keys) and reported >= len(keys):
                    break
                if time.monotonic() > deadline:
                    log("timeout waiting for delivery and reports")
                    break
                if time.monotonic() - last > 5:
                    log(f"  at sink {delivered}/{len(keys)}, reported {reported}")
                    last = time.monotonic()
                time.sleep(0.25)
            t_delivered = time.time()
            time.sleep(3)  # late duplicates (a resend racing the last arrivals) still count
            tracker.poll()

            tids = [t[0] for t in tenants]
            sink_per_tenant = counts_at_sink(tracker, tids)
            t0 = time.monotonic()
            ch = wait_equal("ClickHouse sent per tenant", lambda: {t: clickhouse_sent(system.url("metrics"),
                                                                                      internal).get(t, 0)
                                                                    for t in tids},
                            sink_per_tenant, args.settle_timeout)
            ch_s = time.monotonic() - t0
            led = wait_equal("domain ledger per tenant", lambda: ledger_counts(api, tenants),
                             {t: (n, n) for t, n in sink_per_tenant.items()}, args.settle_timeout)
            led_s = time.monotonic() - t0
            tracker.poll()
            # every outcome must be durable by now: one more sender SIGKILL must resend nothing (a
            # final state missing from its recovered table shows up here as mail sent again)
            resent_after_final_kill = None
            if args.final_sender_kill:
                before = sum(tracker.arrivals.values())
                log("final check: SIGKILL sender after everything was delivered")
                wait_recovered(system, kill(system, ["sender"]), args.recover_timeout)
                time.sleep(args.final_wait_s)
                tracker.poll()
                resent_after_final_kill = sum(tracker.arrivals.values()) - before
                log(f"  resent after the final sender restart: {resent_after_final_kill}")
            sender_kills = sum(1 for k in kills if "sender" in k["targets"])
            bound = sender_kills * len(tenants) * CONNECTIONS_PER_ACCOUNT * (1 + UNFLUSHED_PER_WORKER)
            duplicates = sum(c - 1 for k, c in tracker.arrivals.items() if k in keys) - (resent_after_final_kill or 0)
            missing = sum(1 for k in keys if k not in tracker.first_arrival)
            missing_reports = sum(1 for k in keys if k not in tracker.report_at)
            dup_reports = sum(c - 1 for k, c in tracker.reports.items() if k in keys)
            unexpected = sum(1 for k in tracker.arrivals if k not in keys)
            clean = {
                "no_missing": missing == 0,
                "duplicates_within_bound": duplicates <= bound,
                "no_unexpected": unexpected == 0,
                "no_missing_reports": missing_reports == 0,
                "clickhouse_exact": ch == sink_per_tenant,
                "ledger_exact": led == {t: (n, n) for t, n in sink_per_tenant.items()},
                "nothing_resent_after_final_kill": not resent_after_final_kill,
            }
            result = {
                "messages": args.messages, "tenants": args.tenants, "rate": args.rate, "steps": steps,
                "accepted": len(keys), "refused_by_api": feeder.refused[:20], "retried_calls": feeder.retries,
                "call_errors": dict(feeder.errors.most_common(10)),
                "delivered": len(keys) - missing, "missing": missing,
                "duplicate_deliveries": duplicates, "duplicate_bound": bound,
                "duplicated_messages": sum(1 for k, c in tracker.arrivals.items() if k in keys and c > 1),
                "unexpected_at_sink": unexpected,
                "resent_after_final_sender_kill": resent_after_final_kill,
                "missing_reports": missing_reports, "duplicate_reports": dup_reports,
                "sink_per_tenant": sink_per_tenant, "clickhouse_sent_per_tenant": ch,
                "ledger_today_month_per_tenant": {t: list(v) for t, v in led.items()} if isinstance(led, dict) else led,
                "kills": kills,
                "seconds": {"feed": round(t_accepted - t_start, 1), "delivered": round(t_delivered - t_start, 1),
                            "clickhouse_exact_after_delivery": round(3 + ch_s, 1),
                            "ledger_exact_after_delivery": round(3 + led_s, 1)},
                "restarts_logged": restarts,
                "clean": clean, "ok": all(clean.values()),
                "load": {"uptime_end": uptime()},
            }
            print(json.dumps(result, indent=2))
            out = args.out or REPO / "bench" / "results" / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            log(f"result: {out}  {'CLEAN' if result['ok'] else 'NOT CLEAN: ' + str(clean)}")
            code = 0 if result["ok"] else 1
        finally:
            stop.set()
            if feeder is not None:
                feeder.stop.set()
            stop_system.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
