"""Real servers for tests: a recording SMTP server and the tenant's client application."""

from tests.support.client_app import ClientApp, ReceivedRequest
from tests.support.smtp_server import FailFirst, ReceivedMessage, RecordingSmtpServer

__all__ = ["ClientApp", "FailFirst", "ReceivedMessage", "ReceivedRequest", "RecordingSmtpServer"]
