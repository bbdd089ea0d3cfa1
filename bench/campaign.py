"""Campaign benchmark: a provider-API campaign of N members (default 100,000) against an SMTP sink.

Starts its own system (real Kafka broker, all services, fresh state, free ports) whose system SMTP
account (sender verification mail) is a recording aiosmtpd server of this process and whose DNS checks
go to a loopback DNS server of this process; then, through the provider API only: a user and token,
a domain (verified against the loopback DNS), a sender (verified through the mailed link), a template,
a mailing list, N members added in calls of 10,000, and a campaign at the maximum speed.

Measures:
- members added: seconds and members/s through ``smtp-mailing-members-add``;
- expansion: store -> the campaign's cursor reports every member queued (``smtp-campaign-edit``
  polled every 0.25 s): members/s;
- template render time per message: the engine's own ``build`` (Jinja2 sandbox, HTML autoescaped,
  subject and text, signed unsubscribe link), in this process, over N members;
- end to end: store -> last message at the sink, delivered msg/s (first to last arrival too), and
  exactly once at the sink (missing / duplicate message ids).

    python bench/campaign.py                          # 100,000 members, Postfix smtp-sink
    python bench/campaign.py -n 20000 --sink fast     # smaller, the Python sink

Results are printed and written to bench/results/campaign-<time>.json (or --out)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import procstat  # noqa: E402
from bench.e2e import prom_sum, sender_stages  # noqa: E402
from bench.sinks import make_sink  # noqa: E402
from infra.supervisor import LocalSystem, free_port  # noqa: E402
from tests.integration.test_domains import dns_server  # noqa: E402
from tests.support.smtp_server import RecordingSmtpServer  # noqa: E402

ADMIN = "bench-admin"
HTML = ("<html><body><p>Hello {{ name }},</p><p>News for {{ city }}: our spring offers.</p>"
        "{% if vip %}<p>As a VIP you get 20% off.</p>{% endif %}"
        '<p><a href="https://shop.example.test/offers?c={{ city | urlencode }}">See the offers</a></p>'
        '<p style="font-size:12px"><a href="{{ unsubscribe_url }}">Unsubscribe</a></p></body></html>')
TEXT = "Hello {{ name }}, news for {{ city }}. Unsubscribe: {{ unsubscribe_url }}"
SUBJECT = "Spring news for {{ name }}"


def check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code != 200:
        raise SystemExit(f"{what}: {r.status_code} {r.text[:500]}")
    return r.json()  # type: ignore[no-any-return]


def render_benchmark(n: int) -> dict[str, float]:
    """The engine's per-member build (services/sender/campaigns.py) with the sender's renderers."""
    os.environ.setdefault("POSTBUS_SECRET_KEY", "bench-render-key-material-not-a-secret")
    from services.common import templating
    from services.common import track_tokens as tt
    from services.sender.campaign_runtime import render_text
    from services.sender.campaigns import CampaignDeps, CampaignEngine

    key = b"k" * 32

    def unsub(tenant: str, mid: str, rcpt: str, account: str) -> str:
        return "https://track.example.test/u/" + tt.mint(key, "u", tenant, mid, rcpt, account_id=account,
                                                         ttl_s=86400 * 180)

    def unused(*_: Any) -> Any:
        raise AssertionError

    engine = CampaignEngine(CampaignDeps(
        campaigns=list, cursor=lambda k: None, members_after=unused, suppressed=unused, held=unused,
        partition_of=lambda t: 0, owned=lambda: None, acquire=unused, release=unused, commit=unused,
        catch_up_members=unused, render_html=templating.render, render_text=render_text, unsubscribe_url=unsub))
    camp = {"campaign_id": 1, "tenant_id": "bench", "name": "Spring", "subject": SUBJECT, "html_body": HTML,
            "text_body": TEXT, "from_email": "news@shop.example.test", "from_name": "Shop", "vmta_id": "sink",
            "reply_email": None, "bounce_email": None}
    members = [{"member_id": i, "email": f"m{i}@rcpt.example.test", "name": f"Member {i}",
                "fields": {"city": f"City {i % 100}", "vip": i % 7 == 0}, "status": "subscribed"}
               for i in range(1, n + 1)]
    engine.build(camp, members[0], time.time())  # compile once
    t0 = time.perf_counter()
    for m in members:
        engine.build(camp, m, time.time())
    total = time.perf_counter() - t0
    return {"members": n, "build_s": round(total, 3), "build_us_per_message": round(total / n * 1e6, 1),
            "render_us_per_message": round(engine.stats.render_s / engine.stats.rendered * 1e6, 1)}


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--members", type=int, default=100_000)
    ap.add_argument("--sink", choices=("fast", "smtp-sink"), default="smtp-sink")
    ap.add_argument("--speed", type=int, default=3_600_000, help="messages per hour (the maximum)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--kafka-heap", default="512m")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-render", action="store_true")
    args = ap.parse_args()
    result: dict[str, Any] = {"members": args.members, "sink": args.sink, "speed": args.speed,
                              "uptime_before": os.getloadavg()}
    if not args.skip_render:
        result["render"] = render_benchmark(args.members)
        print(f"render: {result['render']}", flush=True)

    state = REPO / ".state" / f"bench-campaign-{os.getpid()}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    sink = make_sink(args.sink, free_port(), state).start()
    with RecordingSmtpServer() as mailbox, dns_server() as (dns_port, zone):
        env = {"POSTBUS_ALLOW_PRIVATE_NETWORKS": "1", "POSTBUS_DNS_RESOLVERS": f"127.0.0.1:{dns_port}",
               "POSTBUS_SYSTEM_SMTP_HOST": mailbox.host, "POSTBUS_SYSTEM_SMTP_PORT": str(mailbox.port),
               "POSTBUS_SYSTEM_SMTP_TLS": "none", "POSTBUS_SYSTEM_SMTP_FROM": "system@bench.example.test"}
        system = LocalSystem.with_free_ports(state, admin_token=ADMIN, kafka_heap=args.kafka_heap, env=env)
        try:
            system.start()
            api = system.url("api")
            with httpx.Client(base_url=api, headers={"X-API-Token": ADMIN}, timeout=120) as admin:
                check(admin.post("/tenant", json={"id": "bench", "client_base_url": "http://127.0.0.1:9",
                                                  "client_auth": {"method": "none"}}), "POST /tenant")
                check(admin.post("/account", json={"id": "sink", "tenant_id": "bench", "host": "127.0.0.1",
                                                   "port": sink.port, "use_tls": False}), "POST /account")
                check(admin.post("/tenant/bench/users", json={"email": "owner@bench.example.test", "name": "Owner",
                                                              "password": "bench-password-1"}), "users")
            tok = check(httpx.post(f"{api}/api/smtp-token-generate", timeout=30,
                                   json={"email": "owner@bench.example.test", "password": "bench-password-1"}),
                        "token")
            uid = tok["user"]["id"]
            u = httpx.Client(base_url=f"{api}/api/v1", timeout=300,
                             headers={"Authorization": f"Bearer {tok['token']}", "Accept": "application/json"})
            domain = "shop.example.test"
            check(u.post("/smtp-domain-add", json={"user_id": uid, "domain_name": domain}), "domain-add")
            view = check(u.get("/smtp-domain-view", params={"user_id": uid, "domain_name": domain}), "view")["data"]
            with zone.lock:
                for rec in view["dns_records"]:
                    zone.txt[rec["host"].lower()] = [*zone.txt.get(rec["host"].lower(), []), rec["value"]]
            check(u.get("/smtp-domain-verify", params={"user_id": uid, "domain_name": domain}), "verify")
            frm = f"news@{domain}"
            check(u.post("/smtp-domain-sender-add", json={"user_id": uid, "domain_name": domain,
                                                         "from_email": frm, "sender_name": "Shop"}), "sender-add")
            check(u.post("/smtp-domain-sender-verify", json={"user_id": uid, "from_email": frm}), "sender-verify")
            deadline = time.time() + 30
            while not mailbox.messages and time.time() < deadline:
                time.sleep(0.2)
            link = re.search(r"https?://[^\s\"<>]+smtp-sender-confirm\?token=[^\s\"<>]+",
                             mailbox.messages[0].body_text())
            assert link, "no verification link"
            check(httpx.get(link.group(0), timeout=30), "sender-confirm")
            tpl = check(u.post("/smtp-template-add", json={"user_id": uid, "name": "Spring", "html_body": HTML,
                                                          "subject": SUBJECT}), "template")["data"]["template"]["id"]
            lst = check(u.post("/smtp-mailing-add", json={"user_id": uid, "name": "All"}),
                        "list")["data"]["mailing"]["id"]

            t0 = time.time()
            for start in range(0, args.members, 10_000):
                batch = [{"email": f"m{i}@rcpt.example.test", "name": f"Member {i}",
                          "fields": {"city": f"City {i % 100}", "vip": i % 7 == 0}}
                         for i in range(start, min(args.members, start + 10_000))]
                body = check(u.post("/smtp-mailing-members-add", json={"user_id": uid, "mailing_list_id": lst,
                                                                       "members": batch}), "members-add")
                if body["data"]["refused"]:
                    raise SystemExit(f"members refused: {body['data']['refused'][:3]}")
            add_s = time.time() - t0
            result["members_add"] = {"seconds": round(add_s, 2), "members_per_s": round(args.members / add_s, 1)}
            print(f"members added: {result['members_add']}", flush=True)

            sender_cpu0 = procstat.process_cpu_s(system.pid("sender"))
            t_store = time.time()
            camp = check(u.post("/smtp-campaign-store", json={
                "user_id": uid, "template_id": tpl, "mailing_list_id": lst, "campaign_name": "Spring",
                "begins_at": utc(time.time() - 1), "segment": "all",
                "all_request": {"from_email": frm, "from_name": "Shop", "text_body": TEXT, "speed": args.speed,
                                "vmta_id": "sink"}}), "store")["data"]["campaign"]
            cid = camp["id"]
            prefix = f"campaign-{cid}-"
            arrivals: Counter[str] = Counter()
            first = last = None
            expanded_at = None
            queued_samples: list[tuple[float, int]] = []
            deadline = t_store + args.timeout
            next_poll = 0.0
            while time.time() < deadline:
                for mid, _tenant, ts in sink.poll():
                    if mid.startswith(prefix):
                        arrivals[mid] += 1
                        first = ts if first is None else min(first, ts)
                        last = ts if last is None else max(last, ts)
                now = time.time()
                if expanded_at is None and now >= next_poll:
                    next_poll = now + 0.25
                    c = check(u.get("/smtp-campaign-edit", params={"user_id": uid, "campaign_id": cid}),
                              "edit")["data"]["campaign"]
                    queued_samples.append((now - t_store, c["stats"]["queued"]))
                    if c["status"] == "finished":
                        expanded_at = now
                        print(f"expanded: {c['stats']['queued']} in {now - t_store:.1f} s", flush=True)
                if len(arrivals) >= args.members:
                    break
                time.sleep(0.05)
            time.sleep(2.0)
            for mid, _tenant, _ts in sink.poll():
                if mid.startswith(prefix):
                    arrivals[mid] += 1
            started = next((t for t, q in queued_samples if q > 0), None)
            result["expansion"] = {
                "seconds_store_to_finished": round(expanded_at - t_store, 2) if expanded_at else None,
                "members_per_s": round(args.members / (expanded_at - t_store), 1) if expanded_at else None,
                "first_queued_after_s": started,
                "samples": queued_samples[:: max(1, len(queued_samples) // 40)],
            }
            delivered = len(arrivals)
            result["delivery"] = {
                "delivered": delivered, "missing": args.members - delivered,
                "duplicates": sum(v - 1 for v in arrivals.values()),
                "store_to_last_s": round(last - t_store, 2) if last else None,
                "first_to_last_s": round(last - first, 2) if last and first else None,
                "msg_per_s_store_to_last": round(delivered / (last - t_store), 1) if last else None,
                "msg_per_s_first_to_last": round(delivered / (last - first), 1) if last and first and last > first
                else None,
            }
            c = check(u.get("/smtp-campaign-edit", params={"user_id": uid, "campaign_id": cid}), "edit")["data"]
            result["campaign_stats"] = c["campaign"]["stats"]
            internal = {"Authorization": f"Bearer {system.service_env()['POSTBUS_INTERNAL_TOKEN']}"}
            result["sender"] = {
                "cpu_s": round(procstat.process_cpu_s(system.pid("sender")) - sender_cpu0, 1),
                "sent": prom_sum(system.url("sender"), "gmp_sent_total", internal),
                "stage_ms": sender_stages(system.url("sender"), internal)}
            result["loadavg_after"] = os.getloadavg()
        finally:
            system.stop()
            sink.stop()
            shutil.rmtree(state, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "expansion"} | {
        "expansion": {k: v for k, v in result.get("expansion", {}).items() if k != "samples"}}, indent=2))
    out = args.out or REPO / "bench" / "results" / f"campaign-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
