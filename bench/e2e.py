"""End-to-end benchmark: API accept -> Kafka -> sender -> SMTP sink -> events -> reporter -> client
(and -> metrics/ClickHouse), with the CPU cost of every process.

Starts its own system (real Kafka broker, all services, fresh state, free ports), an SMTP sink in its
own process, and one real client application per tenant (in this process); sends a warm-up, then the
measured load through the REST API, and waits until every accepted message is at the sink, reported to
its client and loaded into ClickHouse. Reports (see bench/README.md for what each number means):

- CPU seconds per 1,000 messages (= CPU ms per message) of every process: api, sender, reporter,
  metrics, inbound, the Kafka broker JVM (the system total), and, not counted in it, the sink, this
  harness (load generator + client apps) and the profilers; plus the CPU the rest of the machine used
- rates: accepted by the API, delivered at the sink, reported at the client (msg/s)
- latency percentiles accept -> sink and accept -> report (p50/p95/p99)
- exactly-once checks: missing / duplicates at the sink, missing / duplicate reports

    python bench/e2e.py                                  # 20,000 messages, 4 tenants, fast sink, closed loop
    python bench/e2e.py --sink smtp-sink                 # Postfix's smtp-sink as the SMTP peer
    python bench/e2e.py --rate 1000 --duration 20        # open loop: 1,000 msg/s offered for 20 s
    python bench/e2e.py --sink smtp-sink --profile /tmp/prof   # + py-spy profile of each service
    python bench/e2e.py -n 10000 --temp-fail-rate 0.1    # 10% greylisted once (451 4.7.1), then accepted

Results are printed and written to bench/results/e2e-<mode>-<sink>-<time>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import procstat  # noqa: E402
from bench.pyspy import Profiler, format_summary  # noqa: E402
from bench.system import start_bench_system  # noqa: E402
from tests.support.client_app import ClientApp  # noqa: E402

Key = tuple[str, str]  # (tenant id, message id)
PYTHON_SERVICES = ("api", "sender", "reporter", "metrics", "inbound")


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def percentiles(values: list[float]) -> dict[str, float | None]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {"p50": r(pct(values, 50)), "p95": r(pct(values, 95)), "p99": r(pct(values, 99)),
            "max": r(max(values)) if values else None,
            "mean": r(statistics.fmean(values)) if values else None}


def make_body(size: int) -> str:
    """A text body of exactly ``size`` bytes in 64-byte lines."""
    lines = []
    n = 0
    while n < size:
        line = (f"Postbus benchmark body line {len(lines):04d} " + "abcdefghij" * 7)[:63] + "\n"
        lines.append(line)
        n += len(line)
    body = "".join(lines)[:size]
    return body[:-1] + "\n" if size else body


def prom_sum(url: str, name: str, headers: dict[str, str], label: str | None = None,
             text: str | None = None) -> float:
    """Sum of a Prometheus counter over its label sets (those containing ``label`` if given), from
    ``text`` (one scrape read several times) or a scrape of its own."""
    if text is None:
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if label is None or label in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def sender_stages(url: str, headers: dict[str, str]) -> dict[str, float]:
    """Mean milliseconds per send stage, from the sender's Prometheus histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"postbus_sender_stage_seconds{suffix}{{stage=\""
            if line.startswith(prefix):
                stage = line[len(prefix):].split('"', 1)[0]
                into[stage] = float(line.rsplit(" ", 1)[1])
    return {k: round(sums[k] / counts[k] * 1000, 2) for k in sums if counts.get(k)}


class QueueSampler(threading.Thread):
    """Where messages wait, twice a second during the measured interval: the sender's pending
    messages (accepted into its table, not yet sent: ``gmp_pending_messages``) and its consumer lag
    on postbus.commands (records on the broker not yet read: ``postbus_consumer_lag``). One scrape
    per sender and sample (the sender renders its metrics in a thread that takes the GIL from its
    event loop: three scrapes per sample were 3.6 % of the sender's profile)."""

    def __init__(self, urls: list[str], headers: dict[str, str], every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.urls, self.headers, self.every_s = urls, headers, every_s  # every sender instance
        self.samples: list[tuple[float, float, float, float]] = []  # (t, pending, command lag, event lag)
        self.stopped = threading.Event()
        self.t0 = time.time()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                texts = [httpx.get(f"{u}/metrics", headers=self.headers, timeout=10).text for u in self.urls]
                pending = sum(prom_sum("", "gmp_pending_messages", {}, text=t) for t in texts)
                lag = sum(prom_sum("", "postbus_consumer_lag", {}, 'topic="postbus.commands"', text=t) for t in texts)
                elag = sum(prom_sum("", "postbus_consumer_lag", {}, 'topic="postbus.events"', text=t) for t in texts)
            except httpx.HTTPError:
                continue
            self.samples.append((round(time.time() - self.t0, 2), pending, lag, elag))

    def summary(self) -> dict[str, Any]:
        self.stopped.set()
        def stats(i: int) -> tuple[float, float]:
            col = [row[i] for row in self.samples] or [0.0]
            return max(col), round(sum(col) / len(col), 1)

        (pmax, pmean), (cmax, cmean), (emax, emean) = stats(1), stats(2), stats(3)
        return {"sender_pending_max": pmax, "sender_pending_mean": pmean, "command_lag_max": cmax,
                "command_lag_mean": cmean, "event_lag_max": emax, "event_lag_mean": emean, "samples": self.samples}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


class Tracker:
    """Arrivals at the sink and reports at the client apps, read incrementally."""

    def __init__(self, sink, clients: list[tuple[str, ClientApp]]) -> None:
        self.sink = sink
        self.clients = clients
        self.first_arrival: dict[Key, float] = {}
        self.arrivals: Counter[Key] = Counter()
        self.report_at: dict[Key, float] = {}
        self.reports: Counter[Key] = Counter()
        self._seen = [0] * len(clients)

    def poll(self) -> None:
        for mid, tid, ts in self.sink.poll():
            k = (tid, mid)
            self.arrivals[k] += 1
            if k not in self.first_arrival or ts < self.first_arrival[k]:
                self.first_arrival[k] = ts
        for i, (tid, client) in enumerate(self.clients):
            reqs = client.requests
            for req in reqs[self._seen[i]:]:
                if req.authorized and req.method == "POST" and req.path == client.sync_path:
                    for r in req.delivery_report:
                        if "sent_ts" in r:
                            k = (tid, str(r.get("id")))
                            self.reports[k] += 1
                            self.report_at.setdefault(k, req.received_at)
            self._seen[i] = len(reqs)

    def done(self, keys: set[Key]) -> tuple[int, int]:
        return (sum(1 for k in keys if k in self.first_arrival), sum(1 for k in keys if k in self.report_at))


async def _post(client: httpx.AsyncClient, key: str, msgs: list[dict]) -> None:
    r = await client.post("/commands/add-messages", json={"messages": msgs}, headers={"X-API-Token": key})
    if r.status_code != 200 or r.json().get("queued") != len(msgs):
        raise RuntimeError(f"add-messages failed: {r.status_code} {r.text[:300]}")


async def submit_closed(api: str, tenants: list[tuple[str, str]], per_tenant: int, prefix: str, batch: int,
                        concurrency: int, body: str, accepted_at: dict[Key, float]) -> None:
    """Closed loop: batches of ``batch`` messages, tenants interleaved, ``concurrency`` calls in flight
    (each worker sends its next batch when the API answered the previous one)."""
    jobs: list[tuple[str, str, list[dict]]] = []
    for s in range(0, per_tenant, batch):
        for tid, key in tenants:
            ids = [f"{prefix}{i}" for i in range(s, min(per_tenant, s + batch))]
            jobs.append((tid, key, [message(tid, mid, body) for mid in ids]))
    queue: asyncio.Queue[tuple[str, str, list[dict]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=api, timeout=120) as client:
            while not queue.empty():
                tid, key, msgs = queue.get_nowait()
                await _post(client, key, msgs)
                now = time.time()
                for m in msgs:
                    accepted_at[(tid, m["id"])] = now

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def submit_open(api: str, tenants: list[tuple[str, str]], rate: float, duration: float, tick_s: float,
                      body: str, accepted_at: dict[Key, float], offered_at: dict[Key, float],
                      max_connections: int) -> dict:
    """Open loop: every ``tick_s`` (on a fixed schedule that does not wait for answers) the messages due
    by then (rate x elapsed) go out in one add-messages call, tenants in turn. A call still unanswered
    does not delay the next one; calls beyond ``max_connections`` open connections wait for a free one
    (their wait counts in offer -> accept)."""
    loop = asyncio.get_running_loop()
    total = round(rate * duration)
    counters = [0] * len(tenants)
    errors: list[str] = []
    inflight: set[asyncio.Task] = set()
    max_inflight = 0
    lateness: list[float] = []
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(base_url=api, timeout=120, limits=limits) as client:

        # calls beyond max_connections wait here, not in httpcore's pool (whose bookkeeping scans every
        # waiting request on each event: it cost the harness a quarter of its CPU at 100+ waiting calls)
        slots = asyncio.Semaphore(max_connections)

        async def call(tid: str, key: str, msgs: list[dict]) -> None:
            try:
                async with slots:
                    await _post(client, key, msgs)
            except Exception as exc:  # reported, not raised: the schedule goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                return
            now = time.time()
            for m in msgs:
                accepted_at[(tid, m["id"])] = now

        t0 = loop.time()
        wall0 = time.time()
        sent = 0
        tick = 0
        while sent < total:
            due_at = t0 + tick * tick_s
            delay = due_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness.append(max(0.0, loop.time() - due_at))
            due = min(total, round(rate * (tick + 1) * tick_s))
            n = due - sent
            tick += 1
            if n <= 0:
                continue
            ti = tick % len(tenants)
            tid, key = tenants[ti]
            ids = [f"o{counters[ti] + i}" for i in range(n)]
            counters[ti] += n
            sent += n
            msgs = [message(tid, mid, body) for mid in ids]
            offered = wall0 + (due_at - t0)
            for m in msgs:
                offered_at[(tid, m["id"])] = offered
            task = asyncio.create_task(call(tid, key, msgs))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            max_inflight = max(max_inflight, len(inflight))
        offer_s = loop.time() - t0
        if inflight:
            await asyncio.gather(*inflight)
    return {"offered": total, "offer_seconds": round(offer_s, 2), "ticks": tick, "errors": errors[:10],
            "failed_calls": len(errors), "max_calls_in_flight": max_inflight,
            "schedule_lateness_ms": {"p99": round(1000 * (pct(lateness, 99) or 0), 1),
                                     "max": round(1000 * max(lateness, default=0), 1)}}


def message(tid: str, mid: str, body: str) -> dict:
    return {"id": mid, "tenant_id": tid, "account_id": "sink", "from": f"bench@{tid}.test",
            "to": [f"rcpt{zlib.crc32(mid.encode()) % 50}@example.test"], "subject": f"Bench {mid}", "body": body}


def wait_delivered(tracker: Tracker, keys: set[Key], timeout: float, t_start: float, quiet: bool = False) -> bool:
    deadline = time.time() + timeout
    last_print = 0.0
    while True:
        tracker.poll()
        delivered, reported = tracker.done(keys)
        now = time.time()
        if not quiet and now - last_print >= 2.0:
            print(f"  t+{now - t_start:6.1f}s  at sink {delivered:6d}/{len(keys)}  reported {reported:6d}", flush=True)
            last_print = now
        if delivered >= len(keys) and reported >= len(keys):
            return True
        if now > deadline:
            return False
        time.sleep(0.25)


def wait_ingested(url: str, headers: dict[str, str], expected: float, timeout: float) -> tuple[float, bool]:
    """Until the metrics service has loaded ``expected`` 'sent' events into ClickHouse."""
    deadline = time.time() + timeout
    n = 0.0
    while True:
        try:
            n = prom_sum(url, "postbus_metrics_events_ingested_total", headers, 'type="sent"')
        except httpx.HTTPError:
            pass
        if n >= expected:
            return n, True
        if time.time() > deadline:
            return n, False
        time.sleep(0.25)


def cpu_table(cpu: dict[str, float], idle: dict[str, float], system_names: list[str], others: list[str],
              n: int, interval_s: float, machine_other_s: float) -> tuple[dict, str]:
    def net(name: str) -> float | None:
        """CPU beyond what the process burns when idle over the same time (timers, polls)."""
        if name not in idle or not n:
            return None
        return round((1000 * cpu.get(name, 0.0) - idle[name] * interval_s) / n, 4)

    def row(name: str) -> dict:
        s = cpu.get(name, 0.0)
        return {"cpu_s": round(s, 3), "ms_per_msg": round(1000 * s / n, 4) if n else None,
                "cpu_s_per_1000_msgs": round(1000 * s / n, 4) if n else None,
                "pct_of_a_core": round(100 * s / interval_s, 1), "idle_ms_per_s": idle.get(name),
                "net_of_idle_ms_per_msg": net(name)}

    rows = {name: row(name) for name in system_names}
    total = sum(cpu.get(name, 0.0) for name in system_names)
    nets = [rows[name]["net_of_idle_ms_per_msg"] for name in system_names]
    net_total = round(sum(nets), 4) if None not in nets else None
    system_total = {"cpu_s": round(total, 3), "ms_per_msg": round(1000 * total / n, 4) if n else None,
                    "cpu_s_per_1000_msgs": round(1000 * total / n, 4) if n else None,
                    "pct_of_a_core": round(100 * total / interval_s, 1), "net_of_idle_ms_per_msg": net_total}
    not_counted = {name: row(name) for name in others}
    def f(v: float | None, spec: str) -> str:
        return format(float("nan") if v is None else v, spec)

    lines = [f"{'process':28} {'CPU s':>8} {'ms/msg':>8} {'% core':>7} {'idle ms/s':>9} {'net ms/msg':>10}"]
    for name in system_names:
        r = rows[name]
        lines.append(f"{name:28} {r['cpu_s']:8.2f} {r['ms_per_msg']:8.3f} {r['pct_of_a_core']:7.1f} "
                     f"{f(r['idle_ms_per_s'], '9.1f')} {f(r['net_of_idle_ms_per_msg'], '10.3f')}")
    lines.append(f"{'SYSTEM TOTAL':28} {total:8.2f} {system_total['ms_per_msg']:8.3f} "
                 f"{system_total['pct_of_a_core']:7.1f} {'':9} {f(net_total, '10.3f')}")
    lines.append("not counted:")
    for name in others:
        r = not_counted[name]
        lines.append(f"  {name:26} {r['cpu_s']:8.2f} {r['ms_per_msg']:8.3f} {r['pct_of_a_core']:7.1f}")
    lines.append(f"  {'rest of the machine':26} {machine_other_s:8.2f} {1000 * machine_other_s / n:8.3f} "
                 f"{100 * machine_other_s / interval_s:7.1f}")
    return {"per_process": rows, "system_total": system_total, "not_counted": not_counted,
            "rest_of_machine_cpu_s": round(machine_other_s, 3)}, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=20_000, help="closed loop: messages measured")
    ap.add_argument("-t", "--tenants", type=int, default=4)
    ap.add_argument("--body-bytes", type=int, default=512)
    ap.add_argument("--batch", type=int, default=500, help="closed loop: messages per add-messages call")
    ap.add_argument("--concurrency", type=int, default=4, help="closed loop: parallel API calls")
    ap.add_argument("--rate", type=float, default=None, help="open loop: messages offered per second")
    ap.add_argument("--duration", type=float, default=20.0, help="open loop: seconds of offered load")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="open loop: one add-messages call every T ms")
    ap.add_argument("--max-connections", type=int, default=64, help="open loop: HTTP connections to the API")
    ap.add_argument("--warmup", type=int, default=200, help="messages sent and delivered before measuring")
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle CPU measured after the run")
    ap.add_argument("--idle-settle-s", type=float, default=3.0, help="seconds waited before measuring idle")
    ap.add_argument("--sink", choices=("fast", "smtp-sink"), default="fast")
    ap.add_argument("--temp-fail-rate", type=float, default=0.0,
                    help="fast sink: fraction of messages answered 451 4.7.1 on their first attempt")
    ap.add_argument("--sink-delay-ms", type=float, default=0.0,
                    help="fast sink: each end-of-data reply this much later (a relay that takes its time)")
    ap.add_argument("--retry-base-s", type=float, default=None, help="POSTBUS_SENDER_RETRY_BASE_S for the run")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra service environment")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="py-spy record each Python service during the measured interval into DIR")
    ap.add_argument("--profile-rate", type=int, default=50)
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--profile-blocking", action="store_true",
                    help="py-spy pauses the process per sample (more exact stacks; idle threads then count)")
    ap.add_argument("--top", type=int, default=10, help="functions listed per profile")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--kafka-heap", default="512m")
    ap.add_argument("--senders", type=int, default=1,
                    help="sender processes (the extra ones join the first one's consumer group)")
    ap.add_argument("--label", default="", help="free text stored with the result")
    ap.add_argument("--out", type=Path, default=None, help="result file (default bench/results/e2e-...json)")
    ap.add_argument("--keep", action="store_true", help="keep the state folder")
    args = ap.parse_args()
    open_loop = args.rate is not None

    uptime_before = uptime()
    print(f"uptime before: {uptime_before}", flush=True)
    # the sink and the client apps are on loopback: the network policy must let the services reach them
    env = {"POSTBUS_ALLOW_PRIVATE_NETWORKS": "1", **dict(kv.split("=", 1) for kv in args.env)}
    if args.retry_base_s is not None:
        env["POSTBUS_SENDER_RETRY_BASE_S"] = str(args.retry_base_s)
    profiler: Profiler | None = None
    body = make_body(args.body_bytes)
    stop_system = contextlib.ExitStack()  # closed last in the finally below: clients, system, sink, state folder
    bench = stop_system.enter_context(start_bench_system(
        "bench", admin_token="bench-admin", sink=args.sink, temp_fail_rate=args.temp_fail_rate,
        sink_delay_ms=args.sink_delay_ms, env=env,
        kafka_heap=args.kafka_heap, keep=args.keep))
    system, sink, state = bench.system, bench.sink, bench.state
    try:
        api = bench.api
        internal = bench.internal
        tenants = [(f"bench{i}", bench.add_tenant(f"bench{i}", f"tok{i}")) for i in range(args.tenants)]
        tracker = Tracker(sink, bench.clients)

        extra_senders = [f"sender{i}" for i in range(2, args.senders + 1)]
        extra_pids = {name: bench.start_extra_sender(name) for name in extra_senders}
        if extra_senders:
            print(f"senders: {args.senders} (partitions split between them)", flush=True)

        # -- the processes measured
        pids = {name: system.pid(name) for name in system.services}
        pids.update(extra_pids)
        pids["broker"] = int((state / "kafka" / "kafka.pid").read_text().strip())
        group_extra = {name: [p for p in procstat.process_group_members(pid) if p != pid]
                       for name, pid in pids.items() if name != "broker"}
        group_extra = {k: v for k, v in group_extra.items() if v}
        if group_extra:
            print(f"note: services with other processes in their group (not counted): {group_extra}")
        system_names = [*(n for n in PYTHON_SERVICES if n in pids), *extra_senders, "broker"]
        side = {f"sink ({args.sink})": sink.pid, "harness (load + client apps)": os.getpid()}

        # -- warm-up (not measured): first connections, topic metadata, JIT, tables
        per_tenant_w = max(1, args.warmup // args.tenants) if args.warmup else 0
        warm_keys: set[Key] = set()
        if per_tenant_w:
            warm_at: dict[Key, float] = {}
            asyncio.run(submit_closed(api, tenants, per_tenant_w, "w", min(args.batch, per_tenant_w), args.concurrency,
                                      body, warm_at))
            warm_keys = set(warm_at)
            if not wait_delivered(tracker, warm_keys, 180, time.time(), quiet=True):
                raise SystemExit("warm-up messages were not all delivered and reported within 180 s")
            print(f"warm-up: {len(warm_keys)} messages delivered and reported", flush=True)
        sent_before = sum(prom_sum(u, "gmp_sent_total", internal) for u in bench.sender_urls)

        # -- the measured interval
        if args.profile:
            profiler = Profiler(args.profile, args.profile_rate, native=args.profile_native,
                                blocking=args.profile_blocking)
            # the harness too: it shares the two cores, and should stay cheap
            profiler.start({**{n: pids[n] for n in (*PYTHON_SERVICES, *extra_senders) if n in pids},
                            "harness": os.getpid()})
            time.sleep(1.5)  # py-spy attaches
            side.update(profiler.pids())
        load_start = os.getloadavg()
        cpu0 = procstat.snapshot({**pids, **side})
        t_start = time.time()
        sampler = QueueSampler(bench.sender_urls, internal)
        sampler.start()
        accepted_at: dict[Key, float] = {}
        offered_at: dict[Key, float] = {}
        open_info: dict = {}
        if open_loop:
            print(f"open loop: {args.rate:g} msg/s for {args.duration:g} s, a call every {args.tick_ms:g} ms",
                  flush=True)
            open_info = asyncio.run(submit_open(api, tenants, args.rate, args.duration, args.tick_ms / 1000, body,
                                                accepted_at, offered_at, args.max_connections))
        else:
            per_tenant = args.messages // args.tenants
            print(f"queueing {per_tenant * args.tenants} messages over {args.tenants} tenants ...", flush=True)
            asyncio.run(submit_closed(api, tenants, per_tenant, "b", args.batch, args.concurrency, body, accepted_at))
        t_accepted = time.time()
        print(f"accepted {len(accepted_at)} in {t_accepted - t_start:.2f}s", flush=True)
        keys = set(accepted_at)
        complete = wait_delivered(tracker, keys, args.timeout, t_start)
        t_delivered = time.time()
        queues = sampler.summary()
        print(f"queues: sender pending max {queues['sender_pending_max']:.0f} (mean {queues['sender_pending_mean']}), "
              f"commands not yet read max {queues['command_lag_max']:.0f} (mean {queues['command_lag_mean']}), "
              f"events not yet read by its agents max {queues['event_lag_max']:.0f} (mean {queues['event_lag_mean']})",
              flush=True)
        ingested, ingest_ok = wait_ingested(system.url("metrics"), internal, len(warm_keys) + len(keys),
                                            max(30.0, args.timeout - (t_delivered - t_start)))
        t_end = time.time()
        cpu1 = procstat.snapshot({**pids, **side})
        load_end = os.getloadavg()
        profiles = profiler.stop(args.top) if profiler else {}
        tracker.poll()

        # -- idle cost (background timers, polls) of each process, after the run: warm (the JVM has
        # compiled), a few seconds after the last work
        idle: dict[str, float] = {}
        if args.idle_s > 0:
            time.sleep(args.idle_settle_s)
            idle_pids = {k: v for k, v in {**pids, **side}.items() if not k.startswith("py-spy")}
            a = procstat.snapshot(idle_pids)
            time.sleep(args.idle_s)
            b = procstat.snapshot(idle_pids)
            idle = {k: round(1000 * v / args.idle_s, 1) for k, v in procstat.delta(a, b).items()}
            print(f"idle CPU ms/s: {idle}", flush=True)

        # -- results
        n = len(keys)
        interval = t_end - t_start
        cpu = procstat.delta(cpu0, cpu1)
        machine_other = (cpu1.machine_busy - cpu0.machine_busy) - sum(cpu.values())
        cpu_result, cpu_text = cpu_table(cpu, idle, system_names, list(side), n, interval, machine_other)
        first = {k: tracker.first_arrival[k] for k in keys if k in tracker.first_arrival}
        reported = {k: tracker.report_at[k] for k in keys if k in tracker.report_at}
        sink_lat = [first[k] - accepted_at[k] for k in first]
        report_lat = [reported[k] - accepted_at[k] for k in reported]
        stray = [k for k in tracker.arrivals if k not in keys and k not in warm_keys]
        sent_counter = sum(prom_sum(u, "gmp_sent_total", internal) for u in bench.sender_urls) - sent_before
        last_accept = max(accepted_at.values(), default=t_start)
        result = {
            "mode": "open" if open_loop else "closed",
            "sink": args.sink,
            "label": args.label,
            "messages": n,
            "tenants": args.tenants,
            "body_bytes": args.body_bytes,
            "batch": None if open_loop else args.batch,
            "concurrency": None if open_loop else args.concurrency,
            "warmup": len(warm_keys),
            "profiled": bool(args.profile),
            "temp_fail_rate": args.temp_fail_rate,
            "sink_delay_ms": args.sink_delay_ms,
            "env": env,
            "complete": complete,
            "interval_s": round(interval, 2),
            "seconds": {"accept": round(last_accept - t_start, 2),
                        "deliver_and_report": round(t_delivered - t_start, 2),
                        "clickhouse_loaded": round(t_end - t_start, 2)},
            "rates_msg_per_s": {
                "accepted": round(n / (last_accept - t_start), 1) if last_accept > t_start else None,
                "delivered_at_sink": round(len(first) / (max(first.values()) - t_start), 1) if first else 0,
                "reported_at_client": round(len(reported) / (max(reported.values()) - t_start), 1) if reported else 0,
            },
            "latency_accept_to_sink_s": percentiles(sink_lat),
            "latency_accept_to_report_s": percentiles(report_lat),
            "checks": {
                "missing_at_sink": n - len(first),
                "duplicates_at_sink": sum(c - 1 for k, c in tracker.arrivals.items() if k in keys),
                "unexpected_at_sink": len(stray),
                "missing_reports": n - len(reported),
                "duplicate_reports": sum(c - 1 for k, c in tracker.reports.items() if k in keys),
                "sender_sent_counter": sent_counter,
                "clickhouse_sent_events": ingested,
                "clickhouse_caught_up": ingest_ok,
            },
            "cpu": cpu_result,
            "senders": args.senders,
            "deferred_events": sum(prom_sum(u, "gmp_deferred_total", internal) for u in bench.sender_urls),
            "sender_stage_mean_ms": sender_stages(system.url("sender"), internal),
            "queues": queues,
            "load": {"uptime_before": uptime_before, "loadavg_start": load_start, "loadavg_end": load_end},
            "machine": {"cpus": os.cpu_count()},
        }
        if open_loop:
            offer_lat = [first[k] - offered_at[k] for k in first if k in offered_at]
            api_lat = [accepted_at[k] - offered_at[k] for k in accepted_at if k in offered_at]
            result["open_loop"] = {
                "offered_msg_per_s": args.rate, "duration_s": args.duration, "tick_ms": args.tick_ms,
                **open_info,
                "latency_offer_to_sink_s": percentiles(offer_lat),
                "latency_offer_to_accept_s": percentiles(api_lat),
            }
        if profiles:
            result["profiles"] = {"dir": str(args.profile), "rate_hz": args.profile_rate, "services": profiles}
        result["load"]["uptime_after"] = uptime()

        print(json.dumps({k: v for k, v in result.items() if k not in ("cpu", "profiles")}, indent=2))
        print()
        print(f"CPU over the measured interval ({interval:.1f} s, {n} messages; ms/msg = CPU s per 1,000 msgs):")
        print(cpu_text)
        for name, summary in profiles.items():
            print(summary.get("error") or format_summary(name, summary, args.profile_rate))
        print(f"uptime after: {result['load']['uptime_after']}")
        if open_loop and open_info["schedule_lateness_ms"]["p99"] > args.tick_ms:
            late = open_info["schedule_lateness_ms"]["p99"]
            print(f"WARNING: the load generator fell behind its schedule (p99 {late} ms late): the offered load "
                  "was not steady (machine overloaded?)")
        if open_loop and open_info["failed_calls"]:
            print(f"WARNING: {open_info['failed_calls']} add-messages calls failed (their messages are not counted): "
                  f"{open_info['errors'][:3]}")
        out = args.out or REPO / "bench" / "results" / (
            f"e2e-{result['mode']}-{args.sink}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"result: {out}")
        if not complete or result["checks"]["missing_at_sink"] or result["checks"]["duplicates_at_sink"]:
            sys.exit(1)
    finally:
        if profiler is not None:
            for p in profiler.procs.values():
                if p.poll() is None:
                    p.kill()
        stop_system.close()


if __name__ == "__main__":
    main()
