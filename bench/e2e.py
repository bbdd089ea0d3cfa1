"""End-to-end benchmark: API accept -> Kafka -> sender -> SMTP sink -> events -> reporter -> client.

Starts its own system (real Kafka broker, the four services) on free ports with fresh state, a fast
SMTP sink (bench/fast_sink.py) in its own process, and one real client application per tenant;
queues N messages over T tenants through the REST API and reports:

- ingest rate (API accepted msg/s), delivered-at-sink rate, reported-at-client rate
- p50/p95/p99 latency from API accept to arrival at the sink
- exactly-once counts: missing at the sink, duplicates at the sink, missing reports

    python bench/e2e.py                      # 20,000 messages over 4 tenants
    python bench/e2e.py -n 5000 -t 2 --batch 250
    python bench/e2e.py -n 10000 --temp-fail-rate 0.1   # 10% greylisted once (451 4.7.1), then accepted
Results are printed and written to bench/results/e2e-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.supervisor import LocalSystem, free_port  # noqa: E402
from tests.support.client_app import ClientApp  # noqa: E402


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def sender_stages(url: str, headers: dict[str, str]) -> dict[str, float]:
    """Mean seconds per send stage, from the sender's Prometheus histogram."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", headers=headers, timeout=10).text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            prefix = f"postbus_sender_stage_seconds{suffix}{{stage=\""
            if line.startswith(prefix):
                stage = line[len(prefix):].split('"', 1)[0]
                into[stage] = float(line.rsplit(" ", 1)[1])
    return {k: round(sums[k] / counts[k] * 1000, 2) for k in sums if counts.get(k)}


def sender_counter(url: str, name: str, headers: dict[str, str]) -> float:
    """Sum of a sender counter over all its label sets."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def read_sink(path: Path) -> list[tuple[str, str, float]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 3:
                rows.append((parts[0], parts[1], float(parts[2])))
    return rows


async def submit(api: str, tenants: list[tuple[str, str]], n: int, batch: int, concurrency: int,
                 accepted_at: dict[tuple[str, str], float]) -> float:
    per_tenant = n // len(tenants)
    jobs: list[tuple[str, str, list[dict]]] = []
    for tid, key in tenants:
        ids = [f"b{i}" for i in range(per_tenant)]
        for s in range(0, per_tenant, batch):
            msgs = [{"id": mid, "tenant_id": tid, "account_id": "sink", "from": f"bench@{tid}.test",
                     "to": [f"rcpt{j % 50}@example.test"], "subject": f"Bench {mid}",
                     "body": "Hello from the Postbus benchmark.\n" * 8} for j, mid in enumerate(ids[s:s + batch])]
            jobs.append((tid, key, msgs))
    queue: asyncio.Queue[tuple[str, str, list[dict]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    t0 = time.time()

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=api, timeout=60) as client:
            while not queue.empty():
                tid, key, msgs = queue.get_nowait()
                r = await client.post("/commands/add-messages", json={"messages": msgs},
                                      headers={"X-API-Token": key})
                if r.status_code != 200 or r.json()["queued"] != len(msgs):
                    raise RuntimeError(f"add-messages failed: {r.status_code} {r.text[:300]}")
                now = time.time()
                for m in msgs:
                    accepted_at[(tid, m["id"])] = now

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("-t", "--tenants", type=int, default=4)
    ap.add_argument("--batch", type=int, default=500, help="messages per add-messages call")
    ap.add_argument("--concurrency", type=int, default=4, help="parallel API calls")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the state folder")
    ap.add_argument("--temp-fail-rate", type=float, default=0.0,
                    help="fraction of messages the sink answers 451 4.7.1 on their first attempt")
    ap.add_argument("--retry-base-s", type=float, default=None, help="POSTBUS_SENDER_RETRY_BASE_S for the run")
    args = ap.parse_args()

    state = REPO / ".state" / "bench"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    sink_port = free_port()
    sink_log = state / "sink.log"
    sink = subprocess.Popen([sys.executable, str(REPO / "bench" / "fast_sink.py"), "--port", str(sink_port),
                             "--out", str(sink_log), "--temp-fail-rate", str(args.temp_fail_rate)],
                            stdout=subprocess.DEVNULL)
    env = {"POSTBUS_SENDER_RETRY_BASE_S": str(args.retry_base_s)} if args.retry_base_s is not None else {}
    system = LocalSystem.with_free_ports(state, admin_token="bench-admin", kafka_heap="512m", env=env)
    clients: list[ClientApp] = []
    try:
        system.start()
        api = system.url("api")
        internal = {"Authorization": f"Bearer {system.service_env()['POSTBUS_INTERNAL_TOKEN']}"}  # Prometheus ports
        tenants: list[tuple[str, str]] = []
        with httpx.Client(base_url=api, headers={"X-API-Token": "bench-admin"}, timeout=30) as admin:
            for i in range(args.tenants):
                client = ClientApp(token=f"tok{i}").start()
                clients.append(client)
                tid = f"bench{i}"
                r = admin.post("/tenant", json={"id": tid, "client_base_url": client.url,
                                                "client_auth": {"method": "bearer", "token": f"tok{i}"}})
                r.raise_for_status()
                key = r.json()["api_key"]
                admin.post("/account", json={"id": "sink", "tenant_id": tid, "host": "127.0.0.1",
                                             "port": sink_port, "use_tls": False}).raise_for_status()
                tenants.append((tid, key))
        total = (args.messages // args.tenants) * args.tenants
        accepted_at: dict[tuple[str, str], float] = {}
        print(f"queueing {total} messages over {args.tenants} tenants ...", flush=True)
        t_start = time.time()
        ingest_s = asyncio.run(submit(api, tenants, total, args.batch, args.concurrency, accepted_at))
        print(f"accepted in {ingest_s:.2f}s", flush=True)

        deadline = time.time() + args.timeout
        rows: list[tuple[str, str, float]] = []
        while time.time() < deadline:
            rows = read_sink(sink_log)
            unique = {(t, m) for m, t, _ in rows}
            reported = sum(len({r["id"] for r in c.reports() if "sent_ts" in r}) for c in clients)
            print(f"  t+{time.time() - t_start:6.1f}s  at sink {len(unique):6d}/{total}  reported {reported:6d}",
                  flush=True)
            if len(unique) >= total and reported >= total:
                break
            time.sleep(2.0)
        rows = read_sink(sink_log)
        first_arrival: dict[tuple[str, str], float] = {}
        arrivals: dict[tuple[str, str], int] = {}
        for mid, tid, ts in rows:
            k = (tid, mid)
            arrivals[k] = arrivals.get(k, 0) + 1
            first_arrival[k] = min(ts, first_arrival.get(k, ts))
        report_times: dict[tuple[str, str], float] = {}
        for (tid, _), client in zip(tenants, clients, strict=True):
            for req in client.sync_calls():
                for r in req.delivery_report:
                    if "sent_ts" in r:
                        report_times.setdefault((tid, r["id"]), req.received_at)
        latencies = [first_arrival[k] - accepted_at[k] for k in first_arrival if k in accepted_at]
        missing = [k for k in accepted_at if k not in first_arrival]
        duplicates = sum(n - 1 for n in arrivals.values())
        unreported = [k for k in accepted_at if k not in report_times]
        last_delivery = max(first_arrival.values()) if first_arrival else t_start
        last_report = max(report_times.values()) if report_times else t_start
        result = {
            "messages": total,
            "tenants": args.tenants,
            "batch": args.batch,
            "temp_fail_rate": args.temp_fail_rate,
            "deferred_events": sender_counter(system.url("sender"), "gmp_deferred_total", internal),
            "ingest_msg_per_s": round(total / ingest_s, 1),
            "delivered_msg_per_s": round(len(first_arrival) / (last_delivery - t_start), 1),
            "reported_msg_per_s": round(len(report_times) / (last_report - t_start), 1) if report_times else 0,
            "latency_accept_to_sink_s": {
                "p50": round(pct(latencies, 50), 3), "p95": round(pct(latencies, 95), 3),
                "p99": round(pct(latencies, 99), 3),
                "mean": round(statistics.fmean(latencies), 3) if latencies else None,
            },
            "sender_stage_mean_ms": sender_stages(system.url("sender"), internal),
            "missing_at_sink": len(missing),
            "duplicates_at_sink": duplicates,
            "missing_reports": len(unreported),
            "machine": {"cpus": os.cpu_count()},
        }
        print(json.dumps(result, indent=2))
        out = REPO / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
    finally:
        for c in clients:
            c.stop()
        system.stop()
        sink.terminate()
        sink.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
