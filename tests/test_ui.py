"""`lmtune ui`: the safety rules over HTTP, and the whole flow in a real headless Chromium.

The browser tests drive Debian's chromium with chromium-driver through Selenium. When they are not
installed and this is a Debian-like machine where we are root, the set-up installs them with apt-get
(the test command installs what the tests need); elsewhere the browser tests are skipped, saying why.
Screenshots go to test-artifacts/ui/ at the repository root.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

import lmtune
from lmtune.cli import main
from lmtune.ui.app import UiSettings, check_binding, create_ui
from tests.conftest import toy_rows, write_csv

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "ui"
DEMO = ROOT / "lmtune" / "demo" / "reviews.csv"
POST = {"X-Lmtune-UI": "1"}
TOKEN = "ui-token-0123456789abcdef"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pretrained_tiny):
    """A working directory with a data file and one finished run."""
    d = tmp_path_factory.mktemp("ui")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3))}
    lmtune.train({"output_dir": str(d / "runs"), "run_name": "first", "data": {**data, "max_length": 32},
                  "model": {"name": pretrained_tiny}, "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "progress": "none"}})
    return d


def _client(workdir: Path, **kw) -> TestClient:
    return TestClient(create_ui(UiSettings(runs_dir=str(workdir / "runs"), workdir=str(workdir), **kw)))


def test_file_paths_are_confined_to_the_working_directory(workdir):
    c = _client(workdir)
    assert c.post("/api/init", json={"path": "train.csv"}, headers=POST).status_code == 200
    for bad in ("../outside.csv", "/etc/passwd", "runs/../../x.csv"):
        r = c.post("/api/init", json={"path": bad}, headers=POST)
        assert r.status_code == 403 and "outside the working directory" in r.json()["detail"]
        assert c.post("/api/clean", json={"path": bad, "actions": []}, headers=POST).status_code == 403
    up = c.post("/api/upload?name=../../evil.csv", content=b"text,label\na,b\n", headers=POST)
    assert up.status_code == 200 and up.json()["path"] == "uploads/evil.csv"  # the name's folders are dropped
    assert not (workdir.parent / "evil.csv").exists()
    assert c.get("/run/..%2F..%2Fetc").status_code == 404


def test_uploads_are_limited_in_size_and_type(workdir):
    c = _client(workdir, max_upload_bytes=1000)
    assert c.post("/api/upload?name=big.csv", content=b"x" * 2000, headers=POST).status_code == 413
    assert not (workdir / "uploads" / "big.csv").exists()
    assert c.post("/api/upload?name=run.sh", content=b"echo hi", headers=POST).status_code == 415
    assert c.post("/api/upload?name=ok.csv", content=b"text,label\na,b\n").status_code == 403  # no X-Lmtune-UI header


def test_a_token_is_required_when_set_and_beyond_localhost(workdir, monkeypatch):
    c = _client(workdir, token=TOKEN)
    assert c.get("/").status_code == 401 and c.get("/api/runs").status_code == 401
    assert c.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    first = c.get(f"/?token={TOKEN}")
    assert first.status_code == 200 and c.get("/api/runs").status_code == 200  # the cookie it set
    with pytest.raises(lmtune.InputError, match="LMTUNE_UI_TOKEN"):
        check_binding("0.0.0.0", None)
    monkeypatch.delenv("LMTUNE_UI_TOKEN", raising=False)
    assert main(["ui", str(workdir / "runs"), "--host", "0.0.0.0"]) == 2


def test_cleaned_copy_leaves_the_original_alone(workdir):
    c = _client(workdir)
    before = (workdir / "train.csv").read_text()
    r = c.post("/api/clean", json={"path": "train.csv", "actions": [{"line": 2, "action": "drop"},
                                                                     {"line": 3, "action": "relabel", "label": "pos"}]}, headers=POST)
    assert r.status_code == 200, r.text
    assert (workdir / "train.csv").read_text() == before
    out = (workdir / "cleaned" / "train.cleaned.csv").read_text().splitlines()
    assert len(out) == len(before.splitlines()) - 1 and out[1].endswith(",pos")
    assert (workdir / "cleaned" / "train.cleaned.log.json").is_file()
    bad = c.post("/api/clean", json={"path": "train.csv", "actions": [{"line": 999, "action": "drop"}]}, headers=POST)
    assert bad.status_code == 422 and "line 999" in bad.json()["detail"]


# ---- the browser ----------------------------------------------------------------------------------
def _chromium() -> tuple[str, str]:
    exe, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (exe and driver) and shutil.which("apt-get") and os.geteuid() == 0:
        for cmd in (["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
                    ["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]):
            if subprocess.run(cmd, capture_output=True, check=False, timeout=900).returncode == 0 and cmd[1] == "install":
                break
        exe, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (exe and driver):
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver) to run the browser tests")
    return exe, driver


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    exe, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--disable-gpu"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    b.implicitly_wait(2)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def ui_url(workdir):
    import uvicorn
    shutil.copy(DEMO, workdir / "reviews.csv")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_ui(UiSettings(runs_dir=str(workdir / "runs"), workdir=str(workdir))),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def _wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: condition(b))


def _screenshot(browser, name: str) -> Path:
    """Save a screenshot and check it is not blank (many distinct colours)."""
    from PIL import Image
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    browser.save_screenshot(str(path))
    with Image.open(path) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50, f"{path} looks blank"
    return path


def test_train_inspect_try_and_compare_in_the_browser(browser, ui_url, workdir, pretrained_tiny):
    from selenium.webdriver.common.by import By
    browser.get(ui_url + "/train")
    browser.find_element(By.ID, "upload").send_keys(str(workdir / "reviews.csv"))
    _wait(browser, lambda b: b.find_element(By.ID, "config").get_property("value").strip()
          and b.find_element(By.ID, "start").is_enabled())
    cfg = yaml.safe_load(browser.find_element(By.ID, "config").get_property("value"))
    assert cfg["data"]["train"].endswith("uploads/reviews.csv")
    # edit the config in the page: the tiny backbone and 2 epochs keep the test short
    cfg["model"] = {"name": pretrained_tiny}
    cfg["train"] = {**cfg.get("train", {}), "epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 1}
    cfg["run_name"] = "from-browser"
    browser.execute_script("document.getElementById('config').value = arguments[0];", yaml.safe_dump(cfg))
    browser.find_element(By.ID, "start").click()
    _wait(browser, lambda b: b.find_element(By.ID, "job-status").text.startswith(("finished", "failed")), 300)
    assert browser.find_element(By.ID, "job-status").text.startswith("finished"), browser.find_element(By.ID, "log").text
    bar = browser.find_element(By.ID, "progress")
    assert float(bar.get_property("value")) == float(bar.get_property("max")) > 1  # progress reached the end
    assert "train " in browser.find_element(By.ID, "log").text

    browser.find_element(By.ID, "job-run").click()
    _wait(browser, lambda b: "from-browser" in b.title)
    curve = browser.find_element(By.CSS_SELECTOR, "#learning-curve svg.chart path.series")
    assert curve.get_attribute("d").count("L") > 3
    assert browser.find_elements(By.CSS_SELECTOR, "#learning-curve circle.point title")  # hover values
    cells = browser.find_elements(By.CSS_SELECTOR, "#confusion-matrix td")
    assert len(cells) == 9 and sum(int(c.text) for c in cells) > 0  # the demo's three classes
    _screenshot(browser, "run")

    browser.find_element(By.ID, "try-text").send_keys("Terrible product, it broke after a day.")
    browser.find_element(By.CSS_SELECTOR, "#try-form button").click()
    label = _wait(browser, lambda b: b.find_element(By.ID, "try-label").text)
    assert label in ("positive", "negative", "neutral")
    probs = browser.find_elements(By.CSS_SELECTOR, "#try-result .prob")
    assert len(probs) >= 2

    browser.get(ui_url + "/")
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]")) >= 2)
    browser.find_element(By.ID, "filter").send_keys("from-browser")
    visible = [r for r in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr[data-run]") if r.is_displayed()]
    assert [r.get_attribute("data-run") for r in visible] == ["from-browser"]
    browser.find_element(By.ID, "filter").clear()
    browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    for name in ("first", "from-browser"):
        browser.find_element(By.CSS_SELECTOR, f"input.pick[value='{name}']").click()
    browser.find_element(By.ID, "compare-selected").click()
    _wait(browser, lambda b: "Compare" in b.title)
    rows = browser.find_elements(By.CSS_SELECTOR, "#compare-metrics tr")
    assert len(rows) > 3
    assert "data.train" in browser.find_element(By.ID, "compare-config").text
    assert browser.find_elements(By.CSS_SELECTOR, "#compare-curves svg.chart path.series")
    _screenshot(browser, "compare")


def test_ner_run_page_marks_predicted_and_gold_entities(tmp_path, tiny_model):
    sents = "\n\n".join(["Peter B-PER\nlives O\nin O\nParis B-LOC", "Anna B-PER\nvisits O\nRome B-LOC"] * 20)
    (tmp_path / "train.conll").write_text(sents + "\n")
    lmtune.train({"task": "ner", "output_dir": str(tmp_path / "runs"), "run_name": "ner",
                  "data": {"train": str(tmp_path / "train.conll"), "test": str(tmp_path / "train.conll"), "max_length": 32},
                  "model": {"name": tiny_model},
                  "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1, "calibrate": False}})
    page = _client(tmp_path).get("/run/ner").text
    section = page[page.index('id="ner-sentences"'):]
    assert 'class="ent gold" title="predicted PER, gold PER">Peter<sub>PER</sub>' in section
    assert "per_type" not in section and "Per class" in page  # the per-type table is there too


def test_a_training_job_can_be_stopped_and_a_bad_config_is_refused(workdir, pretrained_tiny):
    c = _client(workdir)
    bad = c.post("/api/jobs", json={"config": "train:\n  epochz: 3\n"}, headers=POST)
    assert bad.status_code == 422 and "epochz" in bad.json()["detail"]
    cfg = {"data": {"train": str(workdir / "train.csv"), "max_length": 32}, "model": {"name": pretrained_tiny},
           "run_name": "to-stop", "train": {"epochs": 1000, "batch_size": 8, "lr": 3e-3}}  # far longer than the test waits
    job = c.post("/api/jobs", json={"config": yaml.safe_dump(cfg)}, headers=POST).json()
    deadline = time.time() + 120
    while c.get(f"/api/jobs/{job['id']}").json()["step"] is None and time.time() < deadline:
        time.sleep(0.5)
    assert c.get(f"/api/jobs/{job['id']}").json()["status"] == "running"
    state = c.post(f"/api/jobs/{job['id']}/stop", headers=POST).json()
    assert state["status"] == "stopped" and state["step"] < state["total"]
    events = c.get(f"/api/jobs/{job['id']}/events").text  # the stream ends with the final state
    assert "event: done" in events and '"status": "stopped"' in events
