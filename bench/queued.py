"""Queued-messages benchmark (issue 11, "Scale"): N messages deferred for hours held by the sender,
its memory, and how long a restarted sender takes to send again.

Starts its own system (real broker, all services, fresh state, the fast sink), creates ``-t``
tenants, queues ``-n`` messages deferred by ``--defer-h`` hours through the REST API, waits until the
sender holds them all (``gmp_pending_messages``), then reads the sender's resident memory. Then it
SIGKILLs the sender (the worst case: no clean shutdown), starts it again, and measures the time until
the sender is ready (table recovered, consuming) and until a fresh message of each tenant, sent right
after the restart, is at the sink ("sending again"). Prints and writes a JSON result.

    python bench/queued.py -n 100000                 # 100,000 queued messages
    python bench/queued.py -n 1000000 --timeout 3600 # the issue's million
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.e2e import message, prom_sum  # noqa: E402
from bench.sinks import make_sink  # noqa: E402
from infra.supervisor import LocalSystem, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def queue(api: str, tenants: list[tuple[str, str]], n: int, batch: int, concurrency: int,
                defer_s: float, body: str) -> float:
    """Queue n deferred messages over the tenants; returns seconds taken."""
    due = time.time() + defer_s
    jobs: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
    per_tenant = n // len(tenants)
    for tid, key in tenants:
        for start in range(0, per_tenant, batch):
            jobs.put_nowait((tid, key, start))
    done = 0
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while not jobs.empty():
            tid, key, start = jobs.get_nowait()
            msgs = [{**message(tid, f"q-{i}", body), "deferred_ts": due}
                    for i in range(start, min(start + batch, per_tenant))]
            r = await client.post("/commands/add-messages", json={"messages": msgs}, headers={"X-API-Token": key})
            if r.status_code != 200:
                raise RuntimeError(f"add-messages: {r.status_code} {r.text[:300]}")
            done += len(msgs)
            if done % (batch * 50) == 0:
                print(f"  queued {done}/{n} ({done / (time.perf_counter() - t0):.0f} msg/s)", flush=True)

    async with httpx.AsyncClient(base_url=api, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.perf_counter() - t0


def wait_pending(url: str, headers: dict[str, str], n: int, timeout: float) -> float:
    deadline = time.time() + timeout
    last = -1.0
    while time.time() < deadline:
        try:
            last = prom_sum(url, "gmp_pending_messages", headers)
        except httpx.HTTPError:
            pass
        if last >= n:
            return last
        time.sleep(1.0)
    raise SystemExit(f"the sender holds {last:.0f} of {n} queued messages after {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=100_000)
    ap.add_argument("-t", "--tenants", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--body-bytes", type=int, default=512)
    ap.add_argument("--defer-h", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--kafka-heap", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    state = REPO / ".state" / f"bench-queued-{os.getpid()}"
    state.mkdir(parents=True, exist_ok=True)
    sink = make_sink("fast", free_port(), state).start()
    env = {"POSTBUS_ALLOW_PRIVATE_NETWORKS": "1"}
    system = LocalSystem.with_free_ports(state, admin_token="bench-admin", kafka_heap=args.kafka_heap, env=env)
    result: dict = {"messages": args.messages, "tenants": args.tenants, "body_bytes": args.body_bytes}
    try:
        system.start()
        internal = {"Authorization": f"Bearer {system.service_env()['POSTBUS_INTERNAL_TOKEN']}"}
        tenants: list[tuple[str, str]] = []
        with httpx.Client(base_url=system.url("api"), headers={"X-API-Token": "bench-admin"}, timeout=60) as admin:
            for i in range(args.tenants):
                tid = f"q{i}"
                r = admin.post("/tenant", json={"id": tid})
                r.raise_for_status()
                tenants.append((tid, r.json()["api_key"]))
                admin.post("/account", json={"id": "sink", "tenant_id": tid, "host": "127.0.0.1",
                                             "port": sink.port, "use_tls": False}).raise_for_status()
        sender_url = system.url("sender")
        rss0 = rss_mb(system.pid("sender"))
        seconds = asyncio.run(queue(system.url("api"), tenants, args.messages, args.batch, args.concurrency,
                                    args.defer_h * 3600, "x" * args.body_bytes))
        t0 = time.perf_counter()
        held = wait_pending(sender_url, internal, args.messages, args.timeout)
        result["queue"] = {"api_seconds": round(seconds, 1), "accepted_msg_per_s": round(args.messages / seconds),
                           "sender_held_after_s": round(seconds + time.perf_counter() - t0, 1), "held": held}
        result["sender_rss_mb"] = {"empty": round(rss0), "holding": round(rss_mb(system.pid("sender")))}
        print(f"sender holds {held:.0f} messages, RSS {result['sender_rss_mb']}", flush=True)

        # restart: SIGKILL, start again, ready, then a fresh message of each tenant at the sink
        system.stop_service("sender", sig=signal.SIGKILL)
        t_kill = time.perf_counter()
        system.start_service("sender", wait=False)
        system.wait_ready("sender", timeout=args.timeout)
        t_ready = time.perf_counter() - t_kill
        probe_ids = {f"probe-{tid}" for tid, _ in tenants}
        with httpx.Client(base_url=system.url("api"), timeout=60) as api:
            for tid, key in tenants:
                api.post("/commands/add-messages", json={"messages": [message(tid, f"probe-{tid}", "probe")]},
                         headers={"X-API-Token": key}).raise_for_status()
        arrived: set[str] = set()
        deadline = time.time() + args.timeout
        while not probe_ids <= arrived and time.time() < deadline:
            arrived |= {mid for mid, _tid, _ts in sink.poll()}
            time.sleep(0.1)
        t_sending = time.perf_counter() - t_kill
        held_after = wait_pending(sender_url, internal, args.messages, args.timeout)
        result["restart"] = {"ready_s": round(t_ready, 1), "sending_again_s": round(t_sending, 1),
                             "probes_delivered": len(probe_ids & arrived), "probes": len(probe_ids),
                             "held_after": held_after,
                             "sender_rss_mb_after": round(rss_mb(system.pid("sender")))}
        print(json.dumps(result, indent=2), flush=True)
        default = REPO / "bench" / "results" / f"queued-{args.messages}-{int(time.time())}.json"
        out = Path(args.out) if args.out else default
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"result: {out}")
    finally:
        system.stop()
        sink.stop()
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
