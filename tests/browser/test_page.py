"""The web page at ``/`` in Chromium against a real ``hsl serve``: submit the ``smoke`` preset
from the form, watch its progress reach 100 %, open its figures and tables; keyless on the
embedded default, and behind the key prompt where keys are required."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.processes import Processes, base_env, wait_http
from tests.servers import free_port

from .conftest import BrowserPage

# long enough for the smoke preset (seconds) on a loaded 2-core machine
RUN_TIMEOUT_MS = 180_000
FIGURES_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#figures img')];
  return imgs.length === 4 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


def _record_failures(page: BrowserPage) -> list[str]:
    """Responses of 400 and above, "STATUS URL" (what a console's "Failed to load" was)."""
    failures: list[str] = []
    page.page.on(
        "response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    return failures


def _submit_smoke_and_check(page: BrowserPage, headers: dict[str, str]) -> str:
    """Submit ``smoke`` from the form; the experiment view reaches 100 %, its figures load and
    its tables match the API's results document. Returns the experiment id."""
    p = page.page
    p.wait_for_selector("#submit-form")
    p.select_option("#preset", "smoke")
    assert "points" in p.locator("#preset-estimate").inner_text()
    p.click("#submit-button")
    p.wait_for_url(re.compile(r"#/experiments/[0-9a-f-]+$"))
    exp_id = p.url.rsplit("/", 1)[-1]

    bar = "#experiment [role=progressbar]"
    p.wait_for_selector(f"{bar}[aria-valuenow='100']", timeout=RUN_TIMEOUT_MS)
    p.wait_for_selector("#experiment .badge[data-status='succeeded']", timeout=RUN_TIMEOUT_MS)
    with httpx.Client(base_url=page.base_url, headers=headers, timeout=30) as api:
        status = api.get(f"/v1/experiments/{exp_id}").json()
        results = api.get(f"/v1/experiments/{exp_id}/results").json()
        features = api.get("/openapi.json").json()["paths"]
    assert status["status"] == "succeeded"
    done, total = status["progress"]["points_done"], status["progress"]["points_total"]
    assert done == total > 0
    assert f"100 % · {done}/{total}" in p.locator(bar).inner_text()

    # live progress came from the events stream where the service has one, else from polling
    mode = p.get_attribute("#live-mode", "data-mode")
    assert mode == ("events" if "/v1/experiments/{experiment_id}/events" in features else "polling")

    p.wait_for_function(FIGURES_LOADED, timeout=60_000)
    plots = {
        n for n in p.eval_on_selector_all("#figures img", "els => els.map(e => e.dataset.plot)")
    }
    assert plots == {"mse", "overlap", "cos2", "spectrum"}

    p.wait_for_selector("#thresholds tbody tr")
    rows = p.locator("#thresholds tbody tr")
    assert rows.count() == len(results["thresholds"]) > 0
    first = rows.nth(0).locator("td").all_inner_texts()
    assert first[0] == "1"
    assert p.locator("#power-law").inner_text().startswith("layerwise_spectral: exponent")
    assert '"name": "smoke"' in p.locator("#spec").inner_text()
    # the tables are the final results', not a partial document fetched while it ran
    p.wait_for_function(
        "() => { const s = document.querySelector('#results-summary');"
        " return s !== null && !s.textContent.includes('partial'); }"
    )
    summary = p.locator("#results-summary").inner_text()
    assert summary.startswith(f"{len(results['points'])} points")
    assert "partial" not in summary

    # back on the list: the row shows the finished experiment
    p.click("header a.brand")
    row = p.locator(f"#experiment-table tr[data-id='{exp_id}']")
    row.wait_for()
    assert row.locator(".badge").inner_text() == "succeeded"
    assert row.locator("[role=progressbar]").get_attribute("aria-valuenow") == "100"
    return exp_id


def test_keyless_page_submits_a_preset_and_shows_progress_and_figures(page):
    failures = _record_failures(page)
    resp = page.goto("/")
    assert resp is not None and resp.status == 200
    page.page.wait_for_selector("body[data-ready='1']")
    assert page.page.locator("#key-state").inner_text() == "keyless (local user)"
    assert not page.page.locator("#key-dialog").is_visible()

    exp_id = _submit_smoke_and_check(page, {})

    # delete from its page (a same-origin DELETE the keyless service's CSRF guard lets through)
    p = page.page
    p.click(f"#experiment-table tr[data-id='{exp_id}'] a")
    p.wait_for_selector("#delete")
    p.once("dialog", lambda d: d.accept())
    p.click("#delete")
    p.wait_for_url(re.compile(r"#/$"))
    p.wait_for_selector("#experiment-table tbody tr")
    assert p.locator(f"#experiment-table tr[data-id='{exp_id}']").count() == 0
    assert httpx.get(f"{page.base_url}/v1/experiments/{exp_id}").status_code == 404

    assert page.console_errors == [], failures
    assert page.external_requests == []


@pytest.fixture
def keyed_server(tmp_path) -> Iterator[tuple[Processes, str]]:
    """``hsl serve`` on loopback with keys required (HSL_REQUIRE_KEYS=1)."""
    port = free_port()
    procs = Processes(tmp_path, base_env(HSL_REQUIRE_KEYS="1"))
    url = f"http://127.0.0.1:{port}"
    procs.start("serve", "serve", "--port", str(port))
    try:
        wait_http(f"{url}/readyz", procs=procs, alive=True)
        yield procs, url
    finally:
        procs.stop_all()


def test_keyed_page_asks_for_a_key_and_works_with_it(browser, keyed_server):
    procs, url = keyed_server
    key = procs.hsl("keys", "create", "--tenant", "alice").split()[-1]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = BrowserPage(context.new_page(), url)
        failures = _record_failures(page)
        p = page.page
        page.goto("/")
        p.wait_for_selector("body[data-ready='1']")
        # the prompt shows before any request: nothing was refused
        dialog = p.locator("#key-dialog")
        assert dialog.is_visible()
        assert p.locator("#key-state").inner_text() == "no key"
        assert page.console_errors == []

        # a wrong key: the API's 401 brings the prompt back with its reason
        p.fill("#key-input", "hsl_not-a-key")
        p.click("#key-submit")
        p.wait_for_selector("#key-error:not([hidden])")
        assert "unknown or revoked API key" in p.locator("#key-error").inner_text()
        assert dialog.is_visible()
        assert p.evaluate("sessionStorage.getItem('hsl.api-key')") is None
        refused = [e for e in page.console_errors if "401" in e]
        assert refused and len(refused) == len(page.console_errors)
        page.console_errors.clear()

        p.fill("#key-input", key)
        p.click("#key-submit")
        assert not dialog.is_visible()
        assert p.evaluate("sessionStorage.getItem('hsl.api-key')") == key
        assert p.locator("#key-state").inner_text() == f"key {key[:8]}…"

        exp_id = _submit_smoke_and_check(page, {"Authorization": f"Bearer {key}"})

        # the experiment is alice's: listed with her key, unknown without it
        with httpx.Client(base_url=url, timeout=30) as api:
            mine = api.get("/v1/experiments", headers={"Authorization": f"Bearer {key}"}).json()
            assert exp_id in [d["id"] for d in mine["items"]]
            assert api.get(f"/v1/experiments/{exp_id}").status_code == 401

        # forgetting the key brings the prompt back
        p.click("#key-forget")
        assert dialog.is_visible()
        assert p.evaluate("sessionStorage.getItem('hsl.api-key')") is None

        assert page.console_errors == [], failures
        assert page.external_requests == []
    finally:
        context.close()


def _all_loaded(selector: str) -> str:
    return f"""() => {{
  const imgs = [...document.querySelectorAll('{selector} img')];
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}}"""


def test_page_runs_a_study_and_compares_its_members(page):
    """Where the service has studies and comparisons (i13-studies): a study of gamma over the
    smoke preset from the page's form, its members and figures, then the comparison view."""
    failures = _record_failures(page)
    p = page.page
    page.goto("/")
    p.wait_for_selector("body[data-ready='1']")
    features = (p.get_attribute("body", "data-features") or "").split()
    if not {"studySubmit", "compare"} <= set(features):
        pytest.skip("this service has no /v1/studies or /v1/compare routes (issue 13 item 1-2)")
    assert p.locator("#nav-studies").is_visible() and p.locator("#nav-compare").is_visible()

    p.select_option("#study-base", "smoke")
    p.fill("#study-name", "smoke-gamma")
    p.fill("#study-axes .axis-path", "model.gamma")
    p.fill("#study-axes .axis-values", "0.8, 1.0")
    p.click("#study-button")
    p.wait_for_url(re.compile(r"#/studies/[^/]+$"))
    study_id = p.url.rsplit("/", 1)[-1]

    p.wait_for_selector("#study [role=progressbar][aria-valuenow='100']", timeout=RUN_TIMEOUT_MS)
    p.wait_for_selector("#study .badge[data-status='succeeded']", timeout=RUN_TIMEOUT_MS)
    with httpx.Client(base_url=page.base_url, timeout=30) as api:
        doc = api.get(f"/v1/studies/{study_id}").json()
    assert doc["name"] == "smoke-gamma" and doc["axes"] == {"model.gamma": [0.8, 1.0]}
    members = p.locator("#member-table tbody tr")
    assert members.count() == len(doc["members"]) == 2
    assert p.locator("#member-table .badge[data-status='succeeded']").count() == 2

    p.wait_for_function(_all_loaded("#study-figures"), timeout=60_000)
    assert p.locator("#study-figures img").count() == len(doc["links"]["plots"])
    p.wait_for_selector("#study-results-table tbody tr")
    assert p.locator("#study-results-table tbody tr").count() == 2

    p.click("text=Compare members")
    p.wait_for_url(re.compile(r"#/compare\?ids="))
    p.wait_for_function(_all_loaded("#compare-figures"), timeout=60_000)
    assert p.locator("#compare-experiments tbody tr").count() == 2
    assert "model.gamma" in p.locator("#compare-differences").inner_text()
    before = p.get_attribute("#compare-figures img", "src")
    p.select_option("#compare-x", "n_over_n_half")
    p.wait_for_function(
        f"() => document.querySelector('#compare-figures img').src !== {before!r}", timeout=60_000
    )
    p.wait_for_function(_all_loaded("#compare-figures"), timeout=60_000)

    # tags and notes of a member, saved with PATCH from its page
    member = doc["members"][0]["experiment_id"]
    p.click(f"#compare-experiments a[href='#/experiments/{member}']")
    p.click("#labels summary")
    p.fill("#tags-input", "gamma-scan, smoke")
    p.fill("#notes-input", "from the page")
    p.click("#labels-save")
    p.wait_for_selector("#labels-message >> text=saved")
    with httpx.Client(base_url=page.base_url, timeout=30) as api:
        saved = api.get(f"/v1/experiments/{member}").json()
    assert saved["tags"] == ["gamma-scan", "smoke"] and saved["notes"] == "from the page"
    assert p.locator("#experiment .tag").all_inner_texts() == ["gamma-scan", "smoke"]

    assert page.console_errors == [], failures
    assert page.external_requests == []
