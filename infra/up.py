"""``python -m infra.up``: the whole system on this machine, until Ctrl-C.

Kafka broker + topics + metrics (embedded ClickHouse) + api + sender + reporter, with state in
``<repo>/.state``, plus a local SMTP sink on 127.0.0.1:2525 that saves every accepted mail as an
.eml file under ``.state/mail/``. Ports come from the usual variables (POSTBUS_API_PORT, ...,
KAFKA_PORT, SMTP_SINK_PORT); other POSTBUS_* variables of the shell are passed to the services.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path

from infra.supervisor import REPO_ROOT, LocalSystem, LocalSystemError


def admin_token(state: Path) -> str:
    token = os.environ.get("POSTBUS_ADMIN_TOKEN")
    if token:
        return token
    path = state / "admin.token"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


class MailSink:
    """aiosmtpd handler: accept everything, save it as .eml, print one line per mail."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._n = itertools.count(1)
        self._parser = email.parser.BytesHeaderParser(policy=email.policy.default)

    async def handle_DATA(self, server, session, envelope) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        n = next(self._n)
        path = self.folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{n:06d}.eml"
        path.write_bytes(raw)
        try:
            subject = self._parser.parsebytes(raw).get("Subject", "")
        except Exception:  # a sink never refuses a mail because of its headers
            subject = "?"
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        print(
            f"[smtp-sink] mail from={envelope.mail_from} to={','.join(envelope.rcpt_tos)} "
            f"subject={subject!r} size={len(raw)} -> {shown}",
            flush=True,
        )
        return "250 2.0.0 OK: saved"


def start_sink(folder: Path, port: int):
    from aiosmtpd.controller import Controller

    controller = Controller(MailSink(folder), hostname="127.0.0.1", port=port, server_hostname="postbus-sink")
    controller.start()
    return controller


class _Stop(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Stop()


def main() -> int:
    state = Path(os.environ.get("POSTBUS_STATE_DIR") or REPO_ROOT / ".state").resolve()
    state.mkdir(parents=True, exist_ok=True)
    env = os.environ
    token = admin_token(state)
    sink_port = int(env.get("SMTP_SINK_PORT", "2525"))
    passthrough = {
        k: v
        for k, v in env.items()
        if k.startswith("POSTBUS_")
        and k not in ("POSTBUS_STATE_DIR", "POSTBUS_ADMIN_TOKEN", "POSTBUS_KAFKA_BOOTSTRAP", "POSTBUS_METRICS_URL")
        and not k.endswith("_PORT")
    }
    # a local trial talks to loopback client apps and sinks: private targets allowed unless the caller
    # says otherwise (POSTBUS_ALLOW_PRIVATE_NETWORKS=false make up runs the production policy)
    passthrough.setdefault("POSTBUS_ALLOW_PRIVATE_NETWORKS", "true")
    private_ok = passthrough["POSTBUS_ALLOW_PRIVATE_NETWORKS"].strip().lower() in ("1", "true", "yes", "on")
    # provider API mail (sender verification links, welcome mail) goes through the operator's system SMTP
    # account: the local sink unless the caller names one (POSTBUS_SYSTEM_SMTP_HOST/_PORT/_USER/...)
    if "POSTBUS_SYSTEM_SMTP_HOST" in passthrough:
        if env.get("POSTBUS_SYSTEM_SMTP_PORT"):  # *_PORT variables are not passed through above
            passthrough["POSTBUS_SYSTEM_SMTP_PORT"] = env["POSTBUS_SYSTEM_SMTP_PORT"]
    else:
        passthrough.update(POSTBUS_SYSTEM_SMTP_HOST="127.0.0.1", POSTBUS_SYSTEM_SMTP_PORT=str(sink_port),
                           POSTBUS_SYSTEM_SMTP_TLS="none")
    system = LocalSystem(
        state,
        kafka_port=int(env.get("KAFKA_PORT", "9092")),
        api_port=int(env.get("POSTBUS_API_PORT", "8000")),
        metrics_port=int(env.get("POSTBUS_METRICS_PORT", "8010")),
        sender_metrics_port=int(env.get("POSTBUS_SENDER_METRICS_PORT", "9101")),
        reporter_metrics_port=int(env.get("POSTBUS_REPORTER_METRICS_PORT", "9102")),
        inbound_metrics_port=int(env.get("POSTBUS_INBOUND_METRICS_PORT", "9103")),
        inbound_smtp_port=int(env.get("POSTBUS_INBOUND_SMTP_PORT", "2526")),
        admin_token=token,
        env=passthrough,
        log=lambda msg: print(f"[up] {msg}", flush=True),
    )
    # Ctrl-C even when started with SIGINT ignored (background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    sink = None
    code = 0
    try:
        sink = start_sink(state / "mail", sink_port)
        print(f"[up] SMTP sink listening on 127.0.0.1:{sink_port} (mail saved to {state / 'mail'})", flush=True)
        system.start()
        api = system.url("api")
        print(
            "\n"
            "  Postbus is running.\n"
            f"    API          {api}\n"
            f"    API docs     {api}/docs\n"
            f"    admin token  {token}\n"
            f"                 (also in {state / 'admin.token'}; send it as X-API-Token)\n"
            f"    SMTP sink    127.0.0.1:{sink_port}  -> {state / 'mail'}/*.eml\n"
            f"    system mail  {passthrough['POSTBUS_SYSTEM_SMTP_HOST']}:"
            f"{passthrough.get('POSTBUS_SYSTEM_SMTP_PORT', 25)}  (provider API verification and welcome mail)\n"
            f"    bounces      127.0.0.1:{system.inbound_smtp_port}  (inbound SMTP: DSN, ARF, PEC receipts)\n"
            f"    metrics      {system.url('metrics')}  (internal: Bearer $(cat {state / 'internal.token'}))\n"
            f"    Kafka        {system.kafka_bootstrap}\n"
            + ("    network      POSTBUS_ALLOW_PRIVATE_NETWORKS=true: callbacks and fetches may reach loopback and\n"
               "                 private addresses (local trial); set it to false for the production policy\n"
               if private_ok else
               "    network      production policy: callbacks and fetches reach public addresses only\n")
            + f"    logs         {system.logs_dir}/\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        # a service that dies is restarted with backoff (logged with its exit code and the attempt)
        supervisor_stop = threading.Event()
        system.supervise(supervisor_stop)
        try:
            while True:
                time.sleep(1)
        finally:
            supervisor_stop.set()
    except (KeyboardInterrupt, _Stop):
        print("\n[up] stopping ...", flush=True)
    except OSError as exc:  # the sink's port is taken, ...
        print(f"[up] ERROR: {exc}", file=sys.stderr, flush=True)
        code = 1
    except LocalSystemError as exc:
        print(f"[up] ERROR: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # a second Ctrl-C must not abort the clean-up half way
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        system.stop()
        if sink is not None:
            sink.stop()
        print("[up] stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
