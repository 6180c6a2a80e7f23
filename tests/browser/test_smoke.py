"""The browser fixture itself: Chromium renders a page the service serves."""

from __future__ import annotations


def test_openapi_json_renders_in_chromium(page):
    response = page.goto("/openapi.json")
    assert response is not None and response.status == 200
    body = page.page.locator("body").inner_text()
    assert '"openapi"' in body and "/v1/experiments" in body
    assert page.external_requests == []
