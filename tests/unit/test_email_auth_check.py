from services.api.email_auth_check import _status


def test_status_mapping() -> None:
    assert _status(["v=spf1 -all"], "v=spf1", "verified") == "verified"
    assert _status(["google-site-verification=x"], "v=spf1", "verified") == "missing"
    assert _status([], "v=dmarc1", "configured") == "missing"
    assert _status(["V=DMARC1; p=reject"], "v=dmarc1", "configured") == "configured"
    assert _status(None, "v=spf1", "verified") == "unknown"
