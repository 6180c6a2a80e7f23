"""The client commands' error paths (their happy paths run end to end in
tests/integration/test_embedded.py against a real ``hsl serve``)."""

from __future__ import annotations

import httpx

from hsl import client
from hsl.cli import main
from tests.servers import free_port


def test_unreachable_service_names_the_url_and_the_fix(monkeypatch, capsys):
    monkeypatch.delenv("HSL_URL", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    # nothing ever answered there: a few seconds of retries (connect_patience), then exit 4
    assert main(["status", "abc", "--url", url]) == 4
    err = capsys.readouterr().err
    assert f"cannot reach the service at {url}" in err
    assert "hsl serve" in err
    assert f"cannot reach the service at {url}, retrying (attempt 1" in err


def test_problem_documents_are_shown_with_their_fields():
    body = {
        "type": "https://hsl.dev/problems/invalid-spec",
        "title": "Invalid experiment spec",
        "status": 422,
        "detail": "model.d: must be in [2, 100000], got 1000000",
        "errors": [{"field": "model.d", "message": "must be in [2, 100000], got 1000000"}],
    }
    text = client._problem_text(httpx.Response(422, json=body))
    assert text.splitlines() == [
        "hsl: Invalid experiment spec (422): model.d: must be in [2, 100000], got 1000000",
        "  model.d: must be in [2, 100000], got 1000000",
    ]
    assert client._problem_text(httpx.Response(502, text="bad gateway")) == (
        "hsl: HTTP 502: bad gateway"
    )


def test_submit_rejects_an_invalid_spec_before_sending(tmp_path, capsys):
    spec = tmp_path / "bad.json"
    spec.write_text('{"model": {"d": 1}}')
    # nothing listens on this port: the spec is refused locally, before any request
    assert main(["submit", str(spec), "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "model.d" in capsys.readouterr().err
