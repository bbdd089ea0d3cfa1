"""RFC 2920 PIPELINING in services/sender/smtp_pool.py (pipelined_sendmail) against a small real
ESMTP server on loopback that offers PIPELINING and records each read: the envelope and DATA go
out in one write, refusals raise what aiosmtplib's sendmail raises, and the session stays usable.
Every test runs on both event loops the sender can use (POSTBUS_EVENT_LOOP): uvloop's transports
keep the protocol methods they were given, so the replies must be taken with set_protocol."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiosmtplib
import pytest
import uvloop

from services.sender.outcomes import classify
from services.sender.smtp_pool import pipelined_sendmail


class Server(asyncio.Protocol):
    reads: list[bytes]
    messages: list[bytes]
    refuse: set[str]  # RCPT addresses answered 550; "MAIL" refuses the sender

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""
        self.in_data = False
        self.rcpts = 0
        self.t.write(b"220 test ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, chunk: bytes) -> None:
        self.reads.append(chunk)
        self.buf += chunk
        out = []
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end == -1 and not self.buf.startswith(b".\r\n"):
                    break
                if self.buf.startswith(b".\r\n"):
                    msg, self.buf = b"", self.buf[3:]
                else:
                    msg, self.buf = self.buf[:end + 2], self.buf[end + 5:]
                self.in_data = False
                if self.rcpts:
                    self.messages.append(msg)
                    out.append(b"250 2.0.0 queued\r\n")
                else:
                    out.append(b"554 5.5.1 no valid recipients\r\n")
                continue
            end = self.buf.find(b"\r\n")
            if end == -1:
                break
            line, self.buf = self.buf[:end].decode(), self.buf[end + 2:]
            verb = line[:4].upper()
            if verb == "EHLO":
                out.append(b"250-test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n")
            elif verb == "MAIL":
                self.rcpts = 0
                self.mail_ok = "MAIL" not in self.refuse
                out.append(b"250 2.1.0 ok\r\n" if self.mail_ok else b"550 5.7.1 sender refused\r\n")
            elif verb == "RCPT":
                addr = line.split(":", 1)[1].strip().strip("<>")
                if not self.mail_ok:
                    out.append(b"503 5.5.1 need MAIL\r\n")
                elif addr in self.refuse:
                    out.append(b"550 5.1.1 no such user\r\n")
                else:
                    self.rcpts += 1
                    out.append(b"250 2.1.5 ok\r\n")
            elif verb == "DATA":
                if self.rcpts:
                    self.in_data = True
                    out.append(b"354 go ahead\r\n")
                else:
                    out.append(b"554 5.5.1 no valid recipients\r\n")
            elif verb == "RSET" or verb == "NOOP":
                out.append(b"250 ok\r\n")
            elif verb == "QUIT":
                out.append(b"221 bye\r\n")
            else:
                out.append(b"502 unknown\r\n")
        if out:
            self.t.write(b"".join(out))  # type: ignore[attr-defined]


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def on_both_loops(test: Callable[[aiosmtplib.SMTP], Awaitable[None]]) -> Callable[[str], None]:
    """Run ``test(client)`` against a fresh server once per event loop (parametrized ``loop``)."""

    async def session() -> None:
        Server.reads, Server.messages, Server.refuse = [], [], set()
        srv = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.sockets[0].getsockname()[1], start_tls=False)
        try:
            await client.connect()
            await client.ehlo()
            assert client.supports_extension("pipelining")
            await asyncio.wait_for(test(client), 10)
        finally:
            client.close()
            srv.close()

    @pytest.mark.parametrize("loop", list(LOOPS))
    def run(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            assert type(runner.get_loop()).__module__.startswith(loop)  # the loop under test
            runner.run(session())

    run.__name__ = test.__name__
    return run


@on_both_loops
async def test_envelope_and_data_in_one_write(server: aiosmtplib.SMTP) -> None:
    Server.reads.clear()
    data = b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n"
    await pipelined_sendmail(server, "a@example.com", ["b@example.org", "c@example.org"], data)
    assert Server.reads[0] == (f"MAIL FROM:<a@example.com> SIZE={len(data)}\r\n".encode()
                               + b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
    assert Server.messages == [b"Subject: x\r\n\r\n..leading dot\r\nbody\r\n"]
    # the session goes on with aiosmtplib's own commands, and pipelined again
    assert (await server.noop()).code == 250
    await pipelined_sendmail(server, "a@example.com", ["d@example.org"], b"Subject: y\r\n\r\nmore")
    assert Server.messages[1] == b"Subject: y\r\n\r\nmore\r\n"


@on_both_loops
async def test_partial_refusal_sends_to_the_others(server: aiosmtplib.SMTP) -> None:
    Server.refuse = {"gone@example.org"}
    await pipelined_sendmail(server, "a@example.com", ["gone@example.org", "ok@example.org"], b"Subject: z\r\n\r\nx")
    assert len(Server.messages) == 1


@on_both_loops
async def test_all_recipients_refused_raises_like_sendmail(server: aiosmtplib.SMTP) -> None:
    Server.refuse = {"gone@example.org"}
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as info:
        await pipelined_sendmail(server, "a@example.com", ["gone@example.org"], b"Subject: z\r\n\r\nx")
    failure = classify(info.value)
    assert not failure.temporary and failure.code == 550 and Server.messages == []
    assert (await server.noop()).code == 250  # replies all read: the session is in step


@on_both_loops
async def test_sender_refused_raises_like_sendmail(server: aiosmtplib.SMTP) -> None:
    Server.refuse = {"MAIL"}
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as info:
        await pipelined_sendmail(server, "a@example.com", ["b@example.org"], b"Subject: z\r\n\r\nx")
    assert info.value.code == 550 and Server.messages == []
    assert (await server.rset()).code == 250


@on_both_loops
async def test_an_address_that_would_break_the_command_is_refused_before_any_write(server: aiosmtplib.SMTP) -> None:
    before = len(Server.reads)
    await pipelined_sendmail(server, "a@example.com", ["ok@example.org"], b"Subject: z\r\n\r\nx")
    assert len(Server.reads) == before + 2  # positive control: the envelope write, then the message write
    for bad in ("x>@example.org", "<x@example.org", "x@example.org\r\nRCPT TO:<y@example.org"):
        with pytest.raises(ValueError):
            await pipelined_sendmail(server, "a@example.com", [bad], b"Subject: z\r\n\r\nx")
    assert len(Server.reads) == before + 2 and len(Server.messages) == 1
