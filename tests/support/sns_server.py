"""A stand-in for Amazon SNS in tests: a test CA, an HTTPS server on localhost (certificate from that
CA) serving the signing certificate and recording SubscribeURL calls, and a signer that produces
SignatureVersion 1/2 messages exactly as SNS does."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from services.common.sns import string_to_sign

CERT_PATH = "/SimpleNotificationService-test.pem"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses"


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: x509.Name | None, issuer_key: rsa.RSAPrivateKey,
          *, ca: bool = False, san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
         .not_valid_after(now + dt.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class SnsTestServer:
    def __init__(self, ca_file: Path) -> None:
        self.ca_key = _key()
        self.ca = _cert("Postbus Test SNS CA", self.ca_key, None, self.ca_key, ca=True)
        ca_file.write_bytes(_pem(self.ca))
        self.tls_key = _key()
        self.tls_cert = _cert("localhost", self.tls_key, self.ca.subject, self.ca_key,
                              san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        self.signing_key = _key()
        self.signing_cert = _cert("sns.amazonaws.com", self.signing_key, self.ca.subject, self.ca_key)
        self.confirmations: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sns-test-")

    @property
    def base(self) -> str:
        assert self._httpd is not None
        return f"https://localhost:{self._httpd.server_address[1]}"

    @property
    def cert_url(self) -> str:
        return self.base + CERT_PATH

    def start(self) -> SnsTestServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == CERT_PATH:
                    body, status = _pem(owner.signing_cert), 200
                elif self.path.startswith("/confirm"):
                    owner.confirmations.append(self.path)
                    body, status = b"<ConfirmSubscriptionResponse/>", 200
                else:
                    body, status = b"not found", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        folder = Path(self._tmp.name)
        (folder / "cert.pem").write_bytes(_pem(self.tls_cert))
        (folder / "key.pem").write_bytes(self.tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self._tmp.cleanup()

    def sign(self, msg: dict[str, Any], version: int = 2, cert_url: str | None = None) -> dict[str, Any]:
        out = {**msg, "SignatureVersion": str(version), "SigningCertURL": cert_url or self.cert_url}
        algorithm = hashes.SHA256() if version == 2 else hashes.SHA1()
        sig = self.signing_key.sign(string_to_sign(out), padding.PKCS1v15(), algorithm)
        out["Signature"] = base64.b64encode(sig).decode()
        return out

    def notification(self, ses: dict[str, Any], topic: str = TOPIC) -> dict[str, Any]:
        return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": topic,
                "Message": json.dumps(ses), "Timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")}

    def subscription(self, topic: str = TOPIC) -> dict[str, Any]:
        token = uuid.uuid4().hex
        return {"Type": "SubscriptionConfirmation", "MessageId": str(uuid.uuid4()), "Token": token,
                "TopicArn": topic, "Message": "You have chosen to subscribe...",
                "SubscribeURL": f"{self.base}/confirm?Token={token}",
                "Timestamp": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")}


def ses_bounce(tenant_id: str, message_id: str, recipient: str, source: str, permanent: bool = True) -> dict[str, Any]:
    return {"notificationType": "Bounce",
            "bounce": {"bounceType": "Permanent" if permanent else "Transient", "bounceSubType": "General",
                       "bouncedRecipients": [{"emailAddress": recipient, "status": "5.1.1",
                                              "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]},
            "mail": _mail(tenant_id, message_id, recipient, source)}


def ses_complaint(tenant_id: str, message_id: str, recipient: str, source: str) -> dict[str, Any]:
    return {"notificationType": "Complaint",
            "complaint": {"complainedRecipients": [{"emailAddress": recipient}], "complaintFeedbackType": "abuse"},
            "mail": _mail(tenant_id, message_id, recipient, source)}


def _mail(tenant_id: str, message_id: str, recipient: str, source: str) -> dict[str, Any]:
    return {"source": source, "destination": [recipient], "messageId": "ses-" + uuid.uuid4().hex,
            "headers": [{"name": "X-Postbus-Message-Id", "value": message_id},
                        {"name": "X-Postbus-Tenant", "value": tenant_id}],
            "commonHeaders": {"from": [source], "messageId": f"<{message_id}@x>"}}
