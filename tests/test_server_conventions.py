"""The conventions other serving tools' users probe for: /health, /info, GET /v1/models in OpenAI's list format,
responses without null fields, a fast /metrics scrape, and /docs that renders with no network (Swagger UI
from the installed package, checked in a headless Chromium that can reach nothing but 127.0.0.1)."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lmtune.serve.app import Metrics, ServeSettings, add_service_routes, create_app
from lmtune.serve.docs import ASSETS_URL, mount_offline_docs
from tests.test_serve import AUTH, KEY, OOS, cls_run, keys, ner_run  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "serve"


def _client(run_dir: str, **settings) -> TestClient:
    return TestClient(create_app(ServeSettings(run_dir=run_dir, backend="torch", **settings)))


def _nulls(value, where: str = "") -> list[str]:
    """Where a JSON value holds null."""
    if value is None:
        return [where or "."]
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in _nulls(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [w for i, v in enumerate(value) for w in _nulls(v, f"{where}[{i}]")]
    return []


# ---- /health, /info, /v1/models -----------------------------------------------------------------

def test_health_info_and_models(cls_run, keys):
    with _client(cls_run) as c:
        for path in ("/health", "/healthz"):  # liveness: no key, like /healthz always was
            assert c.get(path).status_code == 200 and c.get(path).json() == {"status": "ok"}
        for path in ("/info", "/v1/models"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        info = c.get("/info", headers=AUTH).json()
        assert info["model_id"] == "cls" and info["task"] == "classification" and info["max_length"] == 32
        assert set(info["labels"]) == {"pos", "neg"} and info["backend"] == "torch"
        assert info["max_texts"] == 64 and info["lmtune_version"] and info["base_model"] == "backbone"
        assert not _nulls(info)
        text = c.get("/info", headers=AUTH).text
        assert KEY not in text and str(Path(cls_run).parent) not in text  # no key, no server path
        models = c.get("/v1/models", headers=AUTH).json()
        assert models["object"] == "list" and len(models["data"]) == 1
        card = models["data"][0]
        assert card["id"] == "cls" and card["object"] == "model" and card["owned_by"] == "lmtune"
        assert isinstance(card["created"], int) and abs(card["created"] - time.time()) < 7 * 86400
        predicted = c.post("/v1/predict", json={"texts": ["good"]}, headers=AUTH).json()
        assert predicted["model"] == card["id"]  # the id a client picks from the list is the model it gets


# ---- no null fields -----------------------------------------------------------------------------

def test_predictions_leave_out_null_fields_and_keep_the_rest(cls_run, keys):
    with _client(cls_run) as c:
        body = c.post("/v1/predict", json={"texts": ["good food", "awful service", *OOS]}, headers=AUTH).json()
    assert not _nulls(body), _nulls(body)
    assert {"request_id", "model", "backend", "predictions"} <= set(body)
    for p in body["predictions"]:
        assert {"label", "score", "probabilities", "abstained"} <= set(p)  # a field with a value is always there
        assert ("top_label" in p) == p["abstained"]  # only an abstention has a top label
    assert any(p["abstained"] for p in body["predictions"])  # the OOS texts: both shapes were checked


def test_ner_predictions_have_no_null_fields(ner_run, keys):
    with _client(ner_run) as c:
        body = c.post("/v1/predict", json={"texts": ["Peter lives in Paris"]}, headers=AUTH).json()
    assert not _nulls(body), _nulls(body)
    entities = body["predictions"][0]["entities"]
    assert entities and all({"text", "label", "score", "start", "end"} <= set(e) for e in entities)


# ---- /metrics -----------------------------------------------------------------------------------

def test_a_scrape_does_no_model_work(cls_run, keys, monkeypatch):
    """The drift monitor embeds requests in its own thread: a scrape reads gauges, it never calls the model."""
    import lmtune.drift
    with _client(cls_run) as c:
        for i in range(6):
            assert c.post("/v1/predict", json={"texts": [f"good food {i} {j}" for j in range(10)]}, headers=AUTH).status_code == 200
        first = c.get("/metrics", headers=AUTH).text
        assert "lmtune_drift_window_texts 60.0" in first  # the scrape saw every text sent before it

        def no_model(*a, **kw):
            raise AssertionError("a scrape embedded texts")
        monkeypatch.setattr(lmtune.drift, "embed", no_model)
        monkeypatch.setattr(lmtune.drift, "mmd_test", no_model)
        t0 = time.perf_counter()
        again = c.get("/metrics", headers=AUTH)
        assert again.status_code == 200 and "lmtune_drift_window_texts 60.0" in again.text
        assert time.perf_counter() - t0 < 5  # generous: the point is the absence of model calls, not a timing


# ---- /docs --------------------------------------------------------------------------------------

def _docs_checks(c: TestClient, headers: dict | None = None) -> None:
    page = c.get("/docs", headers=headers)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f"{ASSETS_URL}/swagger-ui-bundle.js" in page.text and f"{ASSETS_URL}/swagger-ui.css" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text  # nothing from another host
    js = c.get(f"{ASSETS_URL}/swagger-ui-bundle.js", headers=headers)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and len(js.content) > 100_000
    assert c.get(f"{ASSETS_URL}/swagger-ui.css", headers=headers).status_code == 200
    real = c.get("/openapi.json", headers=headers).json()
    if "/metrics" in real["paths"]:  # the services: the key is a declared scheme, so Swagger UI offers Authorize
        assert real["components"]["securitySchemes"]["HTTPBearer"]["type"] == "http"
        assert real["paths"]["/metrics"]["get"]["security"] == [{"HTTPBearer": []}]
        assert "security" not in real["paths"]["/health"]["get"]
    assert real["openapi"].startswith("3.1") and "/docs" not in real["paths"] and "/redoc" not in real["paths"]
    assert "'/openapi.json'" in page.text  # Swagger UI 5 reads FastAPI's 3.1 document as it is
    redoc = c.get("/redoc", headers=headers)
    assert redoc.status_code == 200 and f"{ASSETS_URL}/redoc.standalone.js" in redoc.text
    assert "https://" not in redoc.text  # no Google fonts, no CDN
    bundle = c.get(f"{ASSETS_URL}/redoc.standalone.js", headers=headers)
    assert bundle.status_code == 200 and len(bundle.content) > 100_000


def test_serve_docs_are_served_from_the_package(cls_run, keys):
    with _client(cls_run) as c:
        _docs_checks(c)  # public, as /openapi.json is


def test_every_service_on_the_shared_routes_gets_docs_health_and_a_guarded_metrics():
    """The assistant and the monitor build on add_service_routes: a bare app on it has all of them."""
    app = FastAPI(title="svc", docs_url=None, redoc_url=None)
    add_service_routes(app, Metrics(), [KEY])
    c = TestClient(app)
    _docs_checks(c)
    assert c.get("/health").json() == {"status": "ok"} and c.get("/metrics").status_code == 401
    with pytest.raises(ValueError, match="docs_url=None"):
        mount_offline_docs(FastAPI())  # FastAPI's own CDN page would shadow it
    with pytest.raises(ValueError, match="redoc_url=None"):
        mount_offline_docs(FastAPI(docs_url=None))


def test_ui_docs_stay_behind_the_dashboard_guard(tmp_path):
    from lmtune.ui.app import UiSettings, create_ui
    (tmp_path / "runs").mkdir()
    token = "ui-token-0123456789abcdef"
    c = TestClient(create_ui(UiSettings(runs_dir=str(tmp_path / "runs"), workdir=str(tmp_path), token=token)),
                   base_url="http://127.0.0.1:7860")
    for path in ("/docs", "/redoc", f"{ASSETS_URL}/swagger-ui-bundle.js", "/openapi.json"):
        assert c.get(path).status_code == 401  # the token, as for every dashboard page
        assert c.get(path, headers={"Authorization": f"Bearer {token}", "Host": "evil.example"}).status_code == 403
    _docs_checks(c, {"Authorization": f"Bearer {token}"})


# ---- /docs in a browser with the network blocked ---------------------------------------------------

@pytest.fixture(scope="module")
def offline_browser():
    """Headless Chromium whose resolver maps every host but 127.0.0.1 to nothing: a page that needs a CDN breaks."""
    from tests.test_ui import headless_chrome
    b = headless_chrome("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    yield b
    b.quit()


def _serve_in_thread(app) -> tuple[str, object, threading.Thread]:
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def _swagger_renders(browser, url: str, operations: set[str], name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from selenium.common.exceptions import WebDriverException
    with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):  # the block itself: no other host answers
        browser.get("http://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css")
    browser.get(url + "/docs")
    WebDriverWait(browser, 60, poll_frequency=0.2).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    shown = {e.get_attribute("data-path") or e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert operations <= shown, shown
    assert "Unable to render" not in browser.find_element(By.TAG_NAME, "body").text
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(url) for u in loaded), loaded  # every script, style and spec from this server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_docs_render_with_the_network_blocked(offline_browser, cls_run, tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_API_KEYS", KEY)
    url, server, thread = _serve_in_thread(create_app(ServeSettings(run_dir=cls_run, backend="torch")))
    try:
        _swagger_renders(offline_browser, url, {"/v1/predict", "/info", "/v1/models", "/health", "/metrics"}, "serve-docs")
        # "Try it out" from the page: the operation runs against the server (an unauthenticated call: 401)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
        block = offline_browser.find_element(By.ID, "operations-default-list_models_v1_models_get")
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        WebDriverWait(offline_browser, 30).until(lambda b: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
        block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
        block.find_element(By.CSS_SELECTOR, ".execute").click()
        status = ".live-responses-table tbody .response-col_status"
        WebDriverWait(offline_browser, 30).until(lambda b: block.find_elements(By.CSS_SELECTOR, status))
        assert "401" in block.find_element(By.CSS_SELECTOR, status).text
    finally:
        server.should_exit = True
        thread.join(30)
    from lmtune.ui.app import UiSettings, create_ui
    (tmp_path / "runs").mkdir()
    url, server, thread = _serve_in_thread(create_ui(UiSettings(runs_dir=str(tmp_path / "runs"), workdir=str(tmp_path))))
    try:
        _swagger_renders(offline_browser, url, {"/api/runs"}, "ui-docs")
    finally:
        server.should_exit = True
        thread.join(30)
