"""A minimal, fast SMTP sink for benchmarks (faster than the pipeline it measures).

Speaks just enough ESMTP (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, PIPELINING) on a raw
asyncio protocol, accepts everything, and appends ``<X-Postbus-Message-Id> <tenant> <epoch_s>``
per received message to an output file (flushed every 200 ms). Not an MTA: no queue, no checks.
With ``--temp-fail-rate F`` it answers ``451 4.7.1`` at the end of DATA to the first attempt of a
fraction F of the messages (chosen by a hash of tenant and id, so it is deterministic), and
accepts their next attempt: greylisting, as the sender sees it. With ``--reply-delay-ms D`` the
replies to a read that ends a message go out D ms later: a relay that takes its time to queue a
message (the sender's pipelined transaction sends nothing more until that reply, so the order of
replies holds).

    python bench/fast_sink.py --port 2526 --out /tmp/sink.log [--temp-fail-rate 0.1] [--reply-delay-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import zlib

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

CID = b"\nx-postbus-message-id: "
TEN = b"\nx-postbus-tenant: "


class Sink(asyncio.Protocol):
    out: list[str]
    fail_permille: int = 0
    reply_delay_s: float = 0.0
    failed_once: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.buf = b""
        self.in_data = False
        self.data: list[bytes] = []
        self.t.write(b"220 sink ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        replies: list[bytes] = []
        ended = False  # this read ended a message
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    # keep the tail that might hold a partial terminator
                    if len(self.buf) > 5:
                        self.data.append(self.buf[:-5])
                        self.buf = self.buf[-5:]
                    break
                self.data.append(self.buf[: end + 2])
                self.buf = self.buf[end + 5:]
                self.in_data = False
                ended = True
                accepted = self._record(b"".join(self.data))
                self.data = []
                replies.append(b"250 2.0.0 Ok: queued\r\n" if accepted else b"451 4.7.1 greylisted, try again\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 104857600\r\n")
            elif verb == b"DATA":
                self.in_data = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 Bye\r\n")
                self.t.write(b"".join(replies))
                self.t.close()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP ...
                replies.append(b"250 Ok\r\n")
        if replies and ended and Sink.reply_delay_s:
            out = b"".join(replies)
            asyncio.get_running_loop().call_later(Sink.reply_delay_s, self._late, out)
        elif replies:
            self.t.write(b"".join(replies))

    def _late(self, out: bytes) -> None:
        if not self.t.is_closing():
            self.t.write(out)

    def _record(self, msg: bytes) -> bool:
        head = b"\n" + msg[: msg.find(b"\r\n\r\n")].replace(b"\r\n", b"\n").lower()
        i = head.find(CID)
        mid = head[i + len(CID): head.find(b"\n", i + 1)].decode(errors="replace") if i >= 0 else "?"
        j = head.find(TEN)
        ten = head[j + len(TEN): head.find(b"\n", j + 1)].decode(errors="replace") if j >= 0 else "?"
        if Sink.fail_permille:
            key = f"{ten} {mid}"
            if key not in Sink.failed_once and zlib.crc32(key.encode()) % 1000 < Sink.fail_permille:
                Sink.failed_once.add(key)
                return False
        Sink.out.append(f"{mid} {ten} {time.time():.6f}\n")
        return True


async def main(port: int, out_path: str) -> None:
    Sink.out = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port, backlog=512)
    with open(out_path, "a", buffering=1 << 16) as fh:  # noqa: ASYNC230 (opened once at start)
        print(f"sink listening on 127.0.0.1:{port}", flush=True)
        async with server:
            while True:
                await asyncio.sleep(0.2)
                if Sink.out:
                    lines, Sink.out = Sink.out, []
                    fh.write("".join(lines))
                    fh.flush()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=2526)
    p.add_argument("--out", required=True)
    p.add_argument("--temp-fail-rate", type=float, default=0.0, help="fraction answered 451 4.7.1 once")
    p.add_argument("--reply-delay-ms", type=float, default=0.0, help="the end-of-data reply this much later")
    a = p.parse_args()
    Sink.fail_permille = round(a.temp_fail_rate * 1000)
    Sink.reply_delay_s = a.reply_delay_ms / 1000
    if uvloop:
        uvloop.install()
    asyncio.run(main(a.port, a.out))
