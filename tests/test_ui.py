"""`lmtune ui`: the safety rules over HTTP, and the whole flow in a real headless Chromium.

The browser tests drive Debian's chromium with chromium-driver through Selenium. When they are not
installed and this is a Debian-like machine where we are root, the set-up installs them with apt-get
(the test command installs what the tests need); elsewhere the browser tests are skipped, saying why.
Screenshots go to test-artifacts/ui/ at the repository root.
"""
from __future__ import annotations

import contextlib
import json
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
from tests.fuzz import fuzz_openapi

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "ui"
DEMO = ROOT / "lmtune" / "demo" / "reviews.csv"
POST = {"X-Lmtune-UI": "1"}
TOKEN = "ui-token-0123456789abcdef"
BASE = "http://127.0.0.1:7860"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pretrained_tiny):
    """A working directory with a data file and one finished run."""
    d = tmp_path_factory.mktemp("ui")
    data = {k: str(write_csv(d / f"{k}.csv", toy_rows(n, s))) for k, n, s in (("train", 96, 1), ("dev", 32, 2), ("test", 32, 3))}
    lmtune.train({"output_dir": str(d / "runs"), "run_name": "first", "data": {**data, "max_length": 32},
                  "model": {"name": pretrained_tiny}, "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "progress": "none"}})
    return d


def _client(workdir: Path, **kw) -> TestClient:
    """A client that names the dashboard as a browser on this machine does (Host: 127.0.0.1:7860)."""
    return TestClient(create_ui(UiSettings(runs_dir=str(workdir / "runs"), workdir=str(workdir), **kw)), base_url=BASE)


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


def headless_chrome(*extra_args: str):
    """Debian's chromium, headless, through Selenium (skips where it cannot be had); extra_args: more flags."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    exe, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--disable-gpu",
                *extra_args):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="module")
def browser():
    b = headless_chrome()
    b.implicitly_wait(2)
    yield b
    b.quit()


@contextlib.contextmanager
def serving(settings: UiSettings):
    """The dashboard on a free localhost port (uvicorn in a thread), as `lmtune ui` serves it; yields its URL."""
    import uvicorn
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_ui(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def ui_url(workdir, pretrained_tiny):
    shutil.copy(DEMO, workdir / "reviews.csv")
    with serving(UiSettings(runs_dir=str(workdir / "runs"), workdir=str(workdir), allow_paths=[pretrained_tiny])) as url:
        yield url


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


def _fill(browser, element_id: str, text: str) -> None:
    """Type into a form control as a person does, then leave it (Tab): its change event fires."""
    from selenium.webdriver.common.keys import Keys
    box = browser.find_element("id", element_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text, Keys.TAB)


def _yaml(browser) -> dict:
    return yaml.safe_load(browser.find_element("id", "config").get_property("value")) or {}


def test_train_inspect_try_and_compare_in_the_browser(browser, ui_url, workdir, pretrained_tiny):
    """Configured and started through the form's controls only (the YAML view is only read), the live
    chart gains points while the job runs; then the run page, Try it, export, and compare."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    browser.get(ui_url + "/train")
    browser.find_element(By.ID, "upload").send_keys(str(workdir / "reviews.csv"))
    _wait(browser, lambda b: _yaml(b).get("data", {}).get("label_column") == "label")  # init's guess of the columns
    assert _yaml(browser)["data"]["train"].endswith("uploads/reviews.csv")
    assert Select(browser.find_element(By.ID, "f-data-train")).first_selected_option.get_attribute("value") == "uploads/reviews.csv"
    columns = [o.text for o in Select(browser.find_element(By.ID, "f-data-label_column")).options]
    assert "text" in columns and "label" in columns  # filled from the file's header
    # the tiny backbone and small settings keep the test short; every value goes in through a form control
    for element_id, value in (("f-model-name", pretrained_tiny), ("f-train-epochs", "2"), ("f-train-batch_size", "8"),
                              ("f-train-lr", "0.003"), ("f-train-seed", "1"), ("f-run_name", "from-browser")):
        _fill(browser, element_id, value)
    Select(browser.find_element(By.ID, "f-peft-method")).select_by_value("none")
    _wait(browser, lambda b: _yaml(b).get("run_name") == "from-browser")
    cfg = _yaml(browser)
    assert cfg["model"]["name"] == pretrained_tiny and cfg["train"] == {"epochs": 2, "batch_size": 8, "lr": 0.003, "seed": 1}
    assert cfg["task"] == "classification" and cfg["data"]["text_column"] == "text"
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    _screenshot(browser, "ui-train-form")

    browser.find_element(By.ID, "start").click()
    seen = []  # the loss chart's train_loss point count, read from the uPlot series while the job runs
    count = "return window.lmtuneLive ? window.lmtuneLive.loss.points('train_loss') : 0"
    deadline = time.time() + 300
    while not browser.find_element(By.ID, "job-status").text.startswith(("finished", "failed")) and time.time() < deadline:
        seen.append(browser.execute_script(count))
        time.sleep(0.15)
    assert browser.find_element(By.ID, "job-status").text.startswith("finished"), browser.find_element(By.ID, "log").text
    growing = sorted({n for n in seen if n})
    assert len(growing) >= 2, seen  # the chart gained points while training ran, not only at the end
    events = [json.loads(x) for x in (workdir / "runs" / "from-browser" / "events.jsonl").read_text().splitlines()]
    steps = [r for r in events if "train_loss" in r]
    _wait(browser, lambda b: b.execute_script(count) == len(steps), 10)  # every step's loss reached the chart
    assert len(steps) > growing[0]
    dev = browser.execute_script("return window.lmtuneLive.metrics.points('dev_accuracy')")
    assert dev == sum("dev_accuracy" in r for r in events) == 2  # one point per evaluation (each epoch)
    browser.execute_script("document.getElementById('start').scrollIntoView()")
    _screenshot(browser, "ui-live")
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

    browser.find_element(By.ID, "export-onnx").click()
    _wait(browser, lambda b: b.find_element(By.ID, "action-status").text.startswith(("export: finished", "export: failed")), 300)
    assert browser.find_element(By.ID, "action-status").text == "export: finished", browser.find_element(By.ID, "action-log").text
    assert (workdir / "runs" / "from-browser" / "export" / "export.json").is_file()
    browser.find_element(By.ID, "push-run").click()  # `lmtune push RUN --to hub/from-browser`: the Hub layout, locally
    _wait(browser, lambda b: b.find_element(By.ID, "action-status").text.startswith(("push: finished", "push: failed")), 300)
    assert browser.find_element(By.ID, "action-status").text == "push: finished", browser.find_element(By.ID, "action-log").text
    assert (workdir / "hub" / "from-browser" / "README.md").is_file()

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


# ---- issue 52 item 6: compare with B - A, the reliability diagram, error analysis ---------------------------
def _results(workdir: Path, run: str) -> dict:
    import json
    return json.loads((workdir / "runs" / run / "results.json").read_text())


def _predictions(workdir: Path, run: str, split: str = "test") -> list[dict]:
    import json
    return [json.loads(x) for x in (workdir / "runs" / run / "predictions" / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def second_run(workdir, pretrained_tiny) -> str:
    """A second run: one epoch, so its dev curves are a single point each; not calibrated, so its confidences
    spread; tested on 48 rows where every third has a word of the other sentiment too and every fourth label
    is flipped, so it has mistakes to show."""
    from tests.conftest import NEG, POS
    data = {k: str(workdir / f"{k}.csv") for k in ("train", "dev")}
    flip = {"pos": "neg", "neg": "pos"}
    rows = [(t + " " + (NEG if lab == "pos" else POS)[i % 8] if i % 3 == 1 else t, flip[lab] if i % 4 == 0 else lab)
            for i, (t, lab) in enumerate(toy_rows(48, 3))]
    data["test"] = str(write_csv(workdir / "test-hard.csv", rows))
    lmtune.train({"output_dir": str(workdir / "runs"), "run_name": "second", "data": {**data, "max_length": 32},
                  "model": {"name": pretrained_tiny},
                  "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "progress": "none", "calibrate": False}})
    return "second"


def test_compare_shows_b_minus_a_overlaid_curves_and_single_points(browser, ui_url, workdir, second_run):
    from selenium.webdriver.common.by import By
    browser.get(f"{ui_url}/compare?run=first&run={second_run}")
    _wait(browser, lambda b: "Compare" in b.title)
    a, b = (_results(workdir, n)["metrics"]["test"] for n in ("first", second_run))
    for key in ("accuracy", "loss", "macro_f1"):
        cell = browser.find_element(By.CSS_SELECTOR, f"#compare-metrics tr[data-metric='test.{key}'] td.diff")
        diff = b[key] - a[key]
        assert float(cell.get_attribute("data-value")) == pytest.approx(diff, abs=1e-12)
        if abs(diff) >= 5e-5:
            assert float(cell.text) == pytest.approx(diff, abs=5e-5)  # "+0.0123", as lmtune compare prints it
        sign = "diff-pos" if diff > 0 else "diff-neg" if diff < 0 else "diff-zero"
        assert sign in cell.get_attribute("class").split()
        colour = {"diff-pos": "rgba(42, 125, 42, 1)", "diff-neg": "rgba(192, 57, 43, 1)", "diff-zero": "rgba(136, 136, 136, 1)"}[sign]
        assert cell.value_of_css_property("color") == colour  # analysis.css colours it by sign
    n_cells = browser.find_elements(By.CSS_SELECTOR, "#compare-metrics tr[data-metric='test.n'] td")
    assert [c.text for c in n_cells] == ["test.n", "32", "48", "+16"]  # counts, not "32.0000"
    # the overlaid dev accuracy: both runs in one chart with a legend; the one-epoch run's single point is drawn
    chart = browser.find_element(By.CSS_SELECTOR, "#compare-curves svg.chart[aria-label='dev_accuracy']")
    assert [t.text for t in chart.find_elements(By.CSS_SELECTOR, "text.legend")] == ["first", second_run]
    lone = chart.find_elements(By.CSS_SELECTOR, f"g.series-group[data-name='{second_run}'] circle.point")
    assert len(lone) == 1 and lone[0].is_displayed()
    cx, cy = float(lone[0].get_attribute("cx")), float(lone[0].get_attribute("cy"))
    assert 48 < cx < 640 - 130 and 22 < cy < 260 - 28  # inside the plot, not on its axes
    # a click on a legend entry hides that run's curve, another shows it again
    group = chart.find_element(By.CSS_SELECTOR, "g.series-group[data-name='first']")
    legend = chart.find_element(By.CSS_SELECTOR, "text.legend[data-name='first']")
    legend.click()
    assert not group.is_displayed()
    legend.click()
    assert group.is_displayed()
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    browser.set_window_size(1280, 1450)  # the table, the config differences and the first overlaid chart
    try:
        _screenshot(browser, "ui-compare")
    finally:
        browser.set_window_size(1280, 1000)


def test_the_run_page_draws_a_reliability_diagram_with_its_ece(browser, ui_url, workdir, second_run):
    from selenium.webdriver.common.by import By
    browser.get(f"{ui_url}/run/{second_run}")
    test = _results(workdir, second_run)["metrics"]["test"]
    svg = browser.find_element(By.CSS_SELECTOR, "#reliability svg.reliability")
    bars = svg.find_elements(By.CSS_SELECTOR, "rect.bin")
    assert len(bars) == len(test["reliability"]) > 1
    assert [int(r.get_attribute("data-count")) for r in bars] == [c for _, _, c in test["reliability"]]
    assert sum(int(r.get_attribute("data-count")) for r in bars) == test["n"]
    assert [float(r.get_attribute("data-accuracy")) for r in bars] == pytest.approx([acc for _, acc, _ in test["reliability"]], abs=1e-6)
    eces = [float(t.get_attribute("data-ece")) for t in svg.find_elements(By.CSS_SELECTOR, "text.ece")]
    assert eces[0] == pytest.approx(test["ece"], abs=1e-6) and f"ECE {test['ece']:.4f}" in svg.text
    assert svg.find_elements(By.CSS_SELECTOR, "line.diagonal") and svg.size["height"] > 200
    browser.execute_script("document.getElementById('reliability').scrollIntoView()")
    _screenshot(browser, "ui-reliability")


def test_reliability_bins_of_saved_predictions_match_the_calibration_code(workdir, second_run):
    """A run without saved bins gets them from its predictions: the same bins as training computed."""
    from lmtune.ui.analysis import bins_from_predictions, ece_of
    saved = _results(workdir, second_run)["metrics"]["test"]
    bins = bins_from_predictions(_predictions(workdir, second_run))
    assert len(bins) > 1 and [b[2] for b in bins] == [b[2] for b in saved["reliability"]]
    for got, want in zip(bins, saved["reliability"]):  # the predictions' scores have 6 decimals
        assert got == pytest.approx(want, abs=1e-5)
    assert ece_of(bins) == pytest.approx(saved["ece"], abs=1e-5)


def test_error_analysis_lists_misclassified_examples_and_filters_them(browser, ui_url, workdir, second_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    rows = _predictions(workdir, second_run)
    assert any(r["label"] != r["gold"] for r in rows)  # the flipped labels
    browser.get(f"{ui_url}/run/{second_run}")
    browser.find_element(By.ID, "errors-link").click()
    _wait(browser, lambda b: b.find_elements(By.ID, "error-filters"))

    def shown() -> int:
        visible = [r for r in browser.find_elements(By.CSS_SELECTOR, "#errors tbody tr") if r.is_displayed()]
        assert browser.find_element(By.ID, "error-count").get_attribute("data-shown") == str(len(visible))
        return len(visible)

    assert len(browser.find_elements(By.CSS_SELECTOR, "#errors tbody tr")) == len(rows)
    assert shown() == sum(r["label"] != r["gold"] for r in rows)  # misclassified only, at first
    Select(browser.find_element(By.ID, "filter-show")).select_by_value("all")
    assert shown() == len(rows)
    gold = rows[0]["gold"]
    Select(browser.find_element(By.ID, "filter-gold")).select_by_visible_text(gold)
    with_gold = [r for r in rows if r["gold"] == gold]
    assert shown() == len(with_gold) < len(rows)
    scores = sorted(r["score"] for r in with_gold)
    cut = scores[len(scores) // 2]
    browser.execute_script("const c = document.getElementById('filter-conf'); c.value = arguments[0];"
                           "c.dispatchEvent(new Event('input'))", str(cut))
    low = [r for r in with_gold if r["score"] <= cut]
    assert shown() == len(low) < len(with_gold)
    other = next(lab for lab in sorted({r["label"] for r in rows} | {r["gold"] for r in rows}) if lab != gold)
    Select(browser.find_element(By.ID, "filter-pred")).select_by_visible_text(other)
    assert shown() == sum(r["label"] == other for r in low)
    assert f"gold={gold}" in browser.current_url and "show=all" in browser.current_url  # the view can be bookmarked
    browser.get(browser.current_url)  # ... and opens filtered
    _wait(browser, lambda b: b.find_element(By.ID, "error-count").get_attribute("data-shown"))
    assert shown() == sum(r["label"] == other for r in low)
    for select in ("filter-pred", "filter-gold"):
        Select(browser.find_element(By.ID, select)).select_by_value("")
    Select(browser.find_element(By.ID, "filter-show")).select_by_value("errors")
    browser.execute_script("const c = document.getElementById('filter-conf'); c.value = 1;"
                           "c.dispatchEvent(new Event('input'))")
    assert shown() == sum(r["label"] != r["gold"] for r in rows)
    _screenshot(browser, "ui-errors")


def test_a_run_without_saved_bins_gets_its_reliability_diagram_from_its_predictions(tmp_path):
    import json
    run = tmp_path / "runs" / "old"
    (run / "predictions").mkdir(parents=True)
    (run / "config.yaml").write_text("task: classification\n")
    (run / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.625, "n": 8}}))  # no reliability, no ECE
    # four answers at confidence 0.55 (two right), four at 0.95 (three right): ECE (4 * 0.05 + 4 * 0.2) / 8
    rows = [{"text": f"t{i}", "label": "a", "score": 0.55 if i < 4 else 0.95, "probabilities": {}, "gold": "a" if i in (0, 1, 4, 5, 6) else "b"}
            for i in range(8)]
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = _client(tmp_path).get("/run/old").text
    section = page[page.index('id="reliability"'):]
    assert section.count('<rect class="bin"') == 2 and 'data-accuracy="0.500000" data-count="4"' in section
    assert 'data-accuracy="0.750000" data-count="4"' in section and "ECE 0.1250" in section


def _ner_run(root: Path, rows: list[dict]) -> None:
    """A run folder as an NER run leaves it: config and test predictions (the rows ner.predictions writes)."""
    import json
    run = root / "runs" / "ner"
    (run / "predictions").mkdir(parents=True)
    (run / "config.yaml").write_text("task: ner\n")
    (run / "predictions" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ner_error_analysis_marks_the_wrong_spans(tmp_path):
    rows = [{"tokens": ["Anna", "visits", "New", "York"], "tags": ["B-PER", "O", "B-LOC", "O"], "gold": ["B-PER", "O", "B-LOC", "I-LOC"],
             "entities": [{"text": "Anna", "label": "PER", "score": 0.97, "token_start": 0, "token_end": 1},
                          {"text": "New", "label": "LOC", "score": 0.61, "token_start": 2, "token_end": 3}]},
            {"tokens": ["Peter", "<b>lives</b>"], "tags": ["B-PER", "O"], "gold": ["B-PER", "O"],
             "entities": [{"text": "Peter", "label": "PER", "score": 0.99, "token_start": 0, "token_end": 1}]},
            {"text": "Rome loves Maria.", "tags": ["B-PER", "O", "B-PER", "O"], "gold": ["B-LOC", "O", "B-PER", "O"],
             "entities": [{"text": "Rome", "label": "PER", "score": 0.55, "start": 0, "end": 4, "token_start": 0, "token_end": 1},
                          {"text": "Maria", "label": "PER", "score": 0.9, "start": 11, "end": 16, "token_start": 2, "token_end": 3}]}]
    _ner_run(tmp_path, rows)
    page = _client(tmp_path).get("/run/ner/errors")
    assert page.status_code == 200
    html = page.text
    assert "<b>lives</b>" not in html and "&lt;b&gt;lives&lt;/b&gt;" in html  # user text is escaped
    # New York: gold LOC missed (the model found only "New"), so both sides mark it wrong; Anna is right
    assert '<mark class="span wrong" data-type="LOC">New York<sub>LOC</sub></mark>' in html
    assert '<mark class="span wrong" data-type="LOC">New<sub>LOC</sub></mark>' in html
    assert '<mark class="span ok" data-type="PER">Anna<sub>PER</sub></mark>' in html
    # a text input's words come from the text: Rome typed wrongly (gold LOC, predicted PER), Maria right
    assert '<mark class="span wrong" data-type="LOC">Rome<sub>LOC</sub></mark>' in html
    assert '<mark class="span wrong" data-type="PER">Rome<sub>PER</sub></mark>' in html
    assert '<mark class="span ok" data-type="PER">Maria<sub>PER</sub></mark>' in html
    assert html.count('data-wrong="1"') == 2 and html.count('data-wrong="0"') == 1
    assert 'data-gold="LOC PER" data-pred="PER"' in html and 'data-conf="0.55"' in html  # what the filters read
    assert "missed LOC “New York”" in html and "predicted LOC “New”" in html


def test_error_analysis_of_a_run_without_labeled_predictions_says_so(dash):
    page = _dash_client(dash).get("/run/r1/errors")
    assert page.status_code == 200 and "No labeled predictions" in page.text
    assert _dash_client(dash).get("/run/nope/errors").status_code == 404


def test_the_yaml_view_follows_the_form_and_the_form_follows_valid_yaml(browser, ui_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    browser.get(ui_url + "/train")
    _wait(browser, lambda b: b.find_element(By.ID, "f-train-epochs").get_property("value") == "3")  # the defaults
    _fill(browser, "f-train-epochs", "7")
    Select(browser.find_element(By.ID, "f-peft-method")).select_by_value("lora")
    browser.find_element(By.ID, "f-train-calibrate").click()
    _wait(browser, lambda b: _yaml(b) == {"train": {"epochs": 7, "calibrate": False}, "peft": {"method": "lora"}})

    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    box = browser.find_element(By.ID, "config")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys("task: regression\npeft:\n  method: ia3\ntrain:\n  epochs: 5\n  lr: 0.002\n")
    _wait(browser, lambda b: b.find_element(By.ID, "f-train-epochs").get_property("value") == "5")
    assert browser.find_element(By.ID, "f-train-lr").get_property("value") == "0.002"
    assert Select(browser.find_element(By.ID, "f-peft-method")).first_selected_option.text == "ia3"
    assert Select(browser.find_element(By.ID, "f-task")).first_selected_option.text == "regression"
    assert browser.find_element(By.ID, "f-train-calibrate").is_selected()  # no longer in the YAML: its default
    box.send_keys("  epochz: 9\n")  # a typo: the form keeps what it shows and says why
    _wait(browser, lambda b: "epochz" in b.find_element(By.ID, "yaml-status").text)
    assert "Did you mean 'train.epochs'" in browser.find_element(By.ID, "yaml-status").text
    assert browser.find_element(By.ID, "f-train-epochs").get_property("value") == "5"


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
    errors = _client(tmp_path).get("/run/ner/errors").text  # the error analysis reads the same predictions
    assert errors.count('<tr class="') == 40 and '<mark class="span' in errors and 'id="error-filters"' in errors


def test_a_training_job_can_be_stopped_and_a_bad_config_is_refused(workdir, pretrained_tiny):
    c = _client(workdir, allow_paths=[pretrained_tiny])  # the tiny backbone is outside the working directory
    bad = c.post("/api/jobs", json={"config": "train:\n  epochz: 3\n"}, headers=POST)
    assert bad.status_code == 422 and "epochz" in bad.json()["detail"]
    # a relative path means the file the form's pickers show, in the working directory (not the job's folder)
    cfg = {"data": {"train": "train.csv", "max_length": 32}, "model": {"name": pretrained_tiny},
           "run_name": "to-stop", "train": {"epochs": 1000, "batch_size": 8, "lr": 3e-3}}  # far longer than the test waits
    job = c.post("/api/jobs", json={"config": yaml.safe_dump(cfg)}, headers=POST).json()
    written = yaml.safe_load((workdir / ".lmtune-ui" / "jobs" / job["id"] / "config.yaml").read_text())
    assert written["data"]["train"] == str((workdir / "train.csv").resolve())
    deadline = time.time() + 120
    while c.get(f"/api/jobs/{job['id']}").json()["step"] is None and time.time() < deadline:
        time.sleep(0.5)
    assert c.get(f"/api/jobs/{job['id']}").json()["status"] == "running"
    state = c.post(f"/api/jobs/{job['id']}/stop", headers=POST).json()
    assert state["status"] == "stopped" and state["step"] < state["total"]
    events = c.get(f"/api/jobs/{job['id']}/events").text  # the stream ends with the final state
    assert "event: done" in events and '"status": "stopped"' in events


def test_the_form_api_merges_into_the_yaml_and_reads_back_only_a_valid_config(workdir):
    c = _client(workdir)
    merged = c.post("/api/form/yaml", json={"config": "# mine\ntrain:\n  warmup_ratio: 0.2\n",
                                              "values": {"data.train": "train.csv", "train.epochs": 2, "peft.method": "lora"}},
                    headers=POST)
    assert merged.status_code == 200, merged.text
    cfg = yaml.safe_load(merged.json()["config"])
    assert cfg == {"train": {"warmup_ratio": 0.2, "epochs": 2}, "peft": {"method": "lora"},  # the YAML's own keys stay
                   "data": {"train": str(workdir / "train.csv")}}  # absolute: a job rebases relative paths on its folder
    removed = c.post("/api/form/yaml", json={"config": merged.json()["config"], "values": {"peft.method": None}}, headers=POST)
    assert "peft" not in yaml.safe_load(removed.json()["config"])  # no empty section left
    values = c.post("/api/form/values", json={"config": merged.json()["config"]}, headers=POST).json()["values"]
    assert values["data.train"] == "train.csv" and values["train.epochs"] == 2 and values["peft.method"] == "lora"
    assert values["train.batch_size"] == 16  # not in the YAML: the default
    bad = c.post("/api/form/values", json={"config": "train:\n  epochz: 2\n"}, headers=POST)
    assert bad.status_code == 422 and "Did you mean 'train.epochs'" in bad.json()["detail"]
    assert c.post("/api/form/values", json={"config": "train: [1\n"}, headers=POST).status_code == 422
    outside = c.post("/api/form/yaml", json={"config": "", "values": {"data.dev": "/etc/passwd"}}, headers=POST)
    assert outside.status_code == 403 and "data.dev" in outside.json()["detail"]
    other = c.post("/api/form/yaml", json={"config": "", "values": {"output_dir": "/tmp"}}, headers=POST)
    assert other.status_code == 422 and "not a key of the training form" in other.json()["detail"]
    not_section = c.post("/api/form/yaml", json={"config": "train: 3\n", "values": {"train.lr": 0.1}}, headers=POST)
    assert not_section.status_code == 422
    cols = c.post("/api/columns", json={"path": "train.csv"}, headers=POST).json()
    assert cols["columns"] == ["text", "label"] and cols["guess"]["data.label_column"] == "label"
    assert c.post("/api/columns", json={"path": "../x.csv"}, headers=POST).status_code == 403


def test_live_events_are_the_history_rows_written_as_training_goes(workdir, tmp_path):
    """The loop callback's events.jsonl holds the same rows as the history.jsonl written at the end; a run
    page shows them while history.jsonl is not written yet."""
    from lmtune.artifacts import RunDir
    from lmtune.ui import views
    rd = RunDir(workdir / "runs" / "first")
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    events = read(rd.events)
    assert events == read(rd.history) and sum("train_loss" in r for r in events) > 10
    assert sum("dev_accuracy" in r for r in events) == 2  # an evaluation per epoch
    training = RunDir(tmp_path / "runs" / "training")
    training.root.mkdir(parents=True)
    for f in (rd.config, rd.events):  # what a run still training has
        shutil.copy(f, training.root / f.name)
    assert views.run_details(tmp_path / "runs", "training")["history"] == events


def test_the_metrics_stream_follows_the_file_and_ends_with_the_job_or_the_client(tmp_path):
    import asyncio
    import subprocess
    import sys
    from lmtune.artifacts import RunDir
    from lmtune.ui.jobs import Job
    from lmtune.ui.live import follow_events, last_event_offset
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()

    async def collect(job, disconnected, start=0, stop_after=None):
        out = []
        async for event in follow_events(job, disconnected, start, poll=0.05):
            out.append(event)
            if stop_after and len(out) == stop_after:
                rd.events.open("a").write('{"step": 2, "train_loss": 0.5}\n{"step": 3, "tra')  # a partial line waits
        return out

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    job = Job("j1", tmp_path / "job", proc, kind="train", run_dir=rd.root)
    rd.events.write_text('{"step": 1, "train_loss": 0.9}\n')

    async def never():
        return False
    events = asyncio.run(collect(job, never, stop_after=1))
    assert proc.poll() is not None  # it ended because the job ended
    data = [e for e in events if e.startswith("id:")]
    assert len(data) == 2 and '"train_loss": 0.5' in data[1]  # the partial third line is never sent
    assert events[-1].startswith("event: done") and '"status": "finished"' in events[-1]
    offset = last_event_offset(data[0].split("\n")[0][4:])
    resumed = asyncio.run(collect(job, never, start=offset))  # a reconnecting browser's Last-Event-ID
    assert [e for e in resumed if e.startswith("id:")] == data[1:]
    assert last_event_offset("x1") == 0 and last_event_offset(None) == 0

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        calls = []

        async def gone_after_two_polls():
            calls.append(1)
            return len(calls) > 2
        t0 = time.time()
        events = asyncio.run(collect(Job("j2", tmp_path / "job", running, run_dir=rd.root), gone_after_two_polls))
        assert time.time() - t0 < 5 and running.poll() is None  # the client left: the stream ended, the job runs on
        assert not any(e.startswith("event: done") for e in events)
    finally:
        running.kill()
        running.wait()


def test_a_run_still_training_is_followed_on_its_page(workdir, tmp_path):
    import asyncio
    import json as _json
    from lmtune.artifacts import RunDir
    from lmtune.ui.live import follow_run
    c = _client(workdir)
    done = c.get("/api/run/first/metrics")  # a finished run: its rows, then the end at once
    assert done.headers["content-type"].startswith("text/event-stream")
    rows = [ln for ln in done.text.splitlines() if ln.startswith("data: {\"step")]
    assert len(rows) == len(RunDir(workdir / "runs" / "first").events.read_text().splitlines())
    assert done.text.rstrip().endswith('"status": "finished"}')
    assert 'id="run-live"' not in c.get("/run/first").text

    rd = RunDir(tmp_path / "runs" / "training")
    rd.root.mkdir(parents=True)
    rd.config.write_text("task: classification\n")
    rd.events.write_text('{"step": 1, "train_loss": 0.7}\n')
    rd.running_marker.write_text(_json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # this process trains it
    page = _client(tmp_path).get("/run/training").text
    assert 'id="run-live"' in page and "/static/live.js" in page
    polls = []

    async def gone_after_three_polls():
        polls.append(1)
        return len(polls) > 3

    async def collect(disconnected):
        return [e async for e in follow_run(rd, disconnected, poll=0.05)]
    events = asyncio.run(collect(gone_after_three_polls))
    assert len([e for e in events if e.startswith("id:")]) == 1 and not any("event: done" in e for e in events)
    rd.running_marker.unlink()  # the training process is gone: the stream ends, saying the run did not finish

    async def never():
        return False
    assert asyncio.run(collect(never))[-1] == 'event: done\ndata: {"run": "training", "status": "stopped"}\n\n'


def test_export_and_push_need_a_finished_run_and_a_folder_inside(workdir, dash):
    d = _dash_client(dash)
    assert d.post("/api/run/r1/export", headers=POST).status_code == 409  # no model yet
    assert d.post("/api/run/nope/export", headers=POST).status_code == 404
    assert d.post("/api/run/r1/export").status_code == 403  # no X-Lmtune-UI header
    c = _client(workdir)
    r = c.post("/api/run/first/push", json={"to": "/elsewhere/hub"}, headers=POST)
    assert r.status_code == 403 and "outside the working directory" in r.json()["detail"]
    r = c.post("/api/run/first/push", json={"to": "hub/first"}, headers=POST)
    assert r.status_code == 200 and r.json()["kind"] == "push"  # `lmtune push RUN --to DIR` as a job
    deadline = time.time() + 180
    while c.get(f"/api/jobs/{r.json()['id']}").json()["status"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    assert c.get(f"/api/jobs/{r.json()['id']}").json()["status"] == "finished"
    assert (workdir / "hub" / "first" / "README.md").is_file() and (workdir / "hub" / "first" / "config.json").is_file()


# ---- issue 46: the Host check, job configs confined, malformed bodies, fuzzing (defects 2 and 9) -------
SECRET = "SECRET-LINE-do-not-show-7f3a9c"
FOREIGN_HOSTS = ("attacker.example:7860", "attacker.example", "127.0.0.1.attacker.example:7860",
                 "localhost.attacker.example", "[2001:db8::1]:7860", "10.0.0.7:7860", "")
LOCAL_HOSTS = ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "localhost", "LOCALHOST:7860", "127.0.0.1")


@pytest.fixture
def dash(tmp_path) -> dict:
    """A working directory with a data file and a run folder, and beside it (outside) a planted secret file,
    a model folder and a symlink to the secret from inside the working directory."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir(), outside.mkdir()
    (work / "train.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    (work / "runs" / "r1").mkdir(parents=True)
    (work / "runs" / "r1" / "config.yaml").write_text("task: classification\n")
    secret = outside / "secret.csv"
    secret.write_text(f"{SECRET}\n{SECRET},x\n")
    (outside / "model").mkdir()
    (outside / "model" / "config.json").write_text(f'{{"model_type": "{SECRET}"}}')
    (work / "link.csv").symlink_to(secret)
    return {"work": work, "outside": outside, "secret": secret}


def _dash_client(dash: dict, **kw) -> TestClient:
    """A client that sees a server error as a 500 response, as a browser does (not as a raised exception)."""
    work = dash["work"]
    return TestClient(create_ui(UiSettings(runs_dir=str(work / "runs"), workdir=str(work), **kw)), base_url=BASE,
                      raise_server_exceptions=False)


def _requests_for_every_route(app):
    """(method, url, json body) for every route in the app's table, path parameters filled in, POST bodies
    valid; Mounts (the static files) by a file they serve."""
    from starlette.routing import Mount
    bodies = {"/api/init": {"path": "train.csv"}, "/api/clean": {"path": "train.csv", "actions": []},
              "/api/jobs": {"config": "train:\n  epochs: 1\n"}, "/api/run/{name}/predict": {"text": "good"},
              "/api/columns": {"path": "train.csv"}, "/api/form/yaml": {"config": "", "values": {"train.epochs": 2}},
              "/api/form/values": {"config": ""}, "/api/run/{name}/push": {"to": "hub"}}
    out = []
    for route in app.routes:
        if isinstance(route, Mount):
            out.append(("GET", route.path + "/ui.css", None))
            continue
        url = route.path.replace("{name}", "r1").replace("{job_id}", "0123456789")
        url += "?name=x.csv" if route.path == "/api/upload" else ""
        out += [(m, url, bodies.get(route.path)) for m in sorted(route.methods - {"HEAD"})]
    return out


def test_a_foreign_host_is_refused_on_every_route(dash):
    """DNS rebinding: a page on attacker.example rebound to 127.0.0.1 sends its own name in Host."""
    app = create_ui(UiSettings(runs_dir=str(dash["work"] / "runs"), workdir=str(dash["work"])))
    c = TestClient(app, base_url=BASE)
    calls = _requests_for_every_route(app)
    assert {u for _, u, _ in calls} >= {"/", "/static/ui.css", "/favicon.ico", "/api/jobs", "/api/clean", "/api/upload?name=x.csv"}
    assert len(calls) >= 16
    for method, url, body in calls:
        for host in FOREIGN_HOSTS:
            r = c.request(method, url, json=body, headers={**POST, "Host": host})
            assert r.status_code == 403 and "Host" in r.json()["detail"], (method, url, host, r.status_code)
    assert not (dash["work"] / ".lmtune-ui").exists() and not (dash["work"] / "uploads").exists()  # nothing ran
    for host in LOCAL_HOSTS:  # the names it was bound to still work
        for url in ("/", "/api/runs", "/static/ui.css", "/openapi.json", "/train"):
            assert c.get(url, headers={"Host": host}).status_code == 200, (url, host)
        assert c.post("/api/init", json={"path": "train.csv"}, headers={**POST, "Host": host}).status_code == 200
    # a token does not open the door to another name; the configured --host is answered
    c = _dash_client(dash, token=TOKEN, host="192.168.7.7")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/", headers={**auth, "Host": "192.168.7.7:7860"}).status_code == 200
    assert c.get("/", headers={**auth, "Host": "attacker.example:7860"}).status_code == 403
    c = _dash_client(dash, token=TOKEN, host="0.0.0.0")  # every interface: its addresses, but never a DNS name
    assert c.get("/", headers={**auth, "Host": "10.1.2.3:7860"}).status_code == 200
    assert c.get("/", headers={**auth, "Host": "attacker.example:7860"}).status_code == 403


def _outside_configs(dash: dict) -> dict[str, dict]:
    out, secret, work = dash["outside"], str(dash["secret"]), dash["work"]
    data = {"train": str(work / "train.csv")}
    inside, leaking = work / "sub_in.yaml", work / "sub_out.yaml"  # multitask sub-task files: their data is read too
    inside.write_text(yaml.safe_dump({"task": "classification", "data": data}))
    leaking.write_text(yaml.safe_dump({"task": "classification", "data": {"train": str(work / "train.csv"), "dev": secret}}))
    return {
        "multitask file": {"data": data, "task": "multitask", "multitask": {"tasks": [str(inside), secret]}},
        "multitask file's data": {"data": data, "task": "multitask", "multitask": {"tasks": [str(inside), str(leaking)]}},
        "data file": {"data": {"train": secret}},
        "data file, relative": {"data": {"train": "../../../../outside/secret.csv"}},  # from the job's folder
        "dev file": {"data": {**data, "dev": secret}},
        "test file, bare key": {"data": data, "test": secret},
        "symlink out": {"data": {"train": str(work / "link.csv")}},
        "hub folder": {"data": {"hub": str(out)}},
        "hub source": {"data": {"train": f"hub:{out}::train"}},
        "attack data": {"data": data, "attack": {"data": secret}},
        "json schema": {"data": data, "generate": {"json_schema": secret}},
        "structured-output schema": {"data": data, "generate": {"schema": secret}},
        "retrieval corpus": {"data": data, "retrieval": {"corpus": secret}},
        "pretrain files": {"data": data, "pretrain": {"files": [secret]}},
        "from run": {"data": data, "continual": {"from_run": str(out)}},
        "run_name ../": {"data": data, "run_name": "../../x"},
        "run_name absolute": {"data": data, "run_name": str(out / "x")},
        "output_dir": {"data": data, "output_dir": str(out / "runs")},
        "model path": {"data": data, "model": {"name": str(out / "model")}},
        "model path, relative": {"data": data, "model": {"name": "../outside/model"}},
        "gguf file": {"data": data, "model": {"name": str(work), "gguf_file": "../outside/secret.csv"}},
        "mlm model": {"data": data, "augment": {"mlm_model": str(out / "model")}},
        "tune storage": {"data": data, "tune": {"storage": f"sqlite:///{out}/study.db"}},
    }


def test_a_job_config_pointing_outside_is_refused_and_starts_nothing(dash):
    c = _dash_client(dash)
    for kind, cfg in _outside_configs(dash).items():
        r = c.post("/api/jobs", json={"config": yaml.safe_dump(cfg)}, headers=POST)
        assert r.status_code == 403, (kind, r.status_code, r.text)
        assert SECRET not in r.text
    assert not (dash["work"] / ".lmtune-ui").exists()  # no job folder, no child, no run
    assert [p.name for p in (dash["work"] / "runs").iterdir()] == ["r1"] and not (dash["outside"] / "x").exists()
    assert c.app.state.ui.jobs.jobs == {}
    from lmtune.ui.confine import unclassified_keys
    assert unclassified_keys() == []  # every config key that names a file or folder is checked


def test_allow_path_lets_a_job_use_a_folder_outside(dash, monkeypatch):
    out = dash["outside"]
    cfg = {"data": {"train": str(dash["secret"])}, "model": {"name": str(out / "model")}, "run_name": "allowed",
           "train": {"epochs": 1}}
    c = _dash_client(dash, allow_paths=[str(out)])
    r = c.post("/api/jobs", json={"config": yaml.safe_dump(cfg)}, headers=POST)
    assert r.status_code == 200, r.text
    job = r.json()["id"]
    assert c.post(f"/api/jobs/{job}/stop", headers=POST).json()["status"] in ("stopped", "failed", "finished")
    assert c.post("/api/init", json={"path": str(dash["secret"])}, headers=POST).status_code != 403
    for kind in ("run_name ../", "output_dir"):  # still refused: not under the allowed folder
        bad = {**_outside_configs(dash)[kind], "output_dir": "/elsewhere"} if kind == "output_dir" else _outside_configs(dash)[kind]
        assert c.post("/api/jobs", json={"config": yaml.safe_dump(bad)}, headers=POST).status_code == 403
    # the command line passes --allow-path DIR (repeatable) to the dashboard's settings
    import lmtune.ui.app as ui_app
    seen = []
    monkeypatch.setattr(ui_app, "serve_ui", lambda settings, host, port: seen.append(settings))
    monkeypatch.delenv("LMTUNE_UI_TOKEN", raising=False)
    assert main(["ui", str(dash["work"] / "runs"), "--allow-path", str(out), "--allow-path", "/data"]) == 0
    assert list(seen[0].allow_paths) == [str(out), "/data"]


def test_no_error_message_shows_a_file_outside(dash):
    """/etc/passwd-style: whatever route names a planted file outside, its content never comes back."""
    c = _dash_client(dash)
    secret, link = str(dash["secret"]), str(dash["work"] / "link.csv")
    texts = []
    for path in (secret, link, "../outside/secret.csv"):
        texts += [c.post("/api/init", json={"path": path}, headers=POST).text,
                  c.post("/api/clean", json={"path": path, "actions": [{"line": 2, "action": "drop"}]}, headers=POST).text]
    for cfg in _outside_configs(dash).values():
        r = c.post("/api/jobs", json={"config": yaml.safe_dump(cfg)}, headers=POST)
        texts.append(r.text)
        if r.status_code == 200:  # (none is started; were one, its event stream must not show the file either)
            texts.append(c.get(f"/api/jobs/{r.json()['id']}/events").text)
    assert all(t for t in texts) and not [t for t in texts if SECRET in t]
    assert not (dash["work"] / "cleaned").exists()


JSON_ROUTES = ("/api/run/r1/predict", "/api/init", "/api/jobs", "/api/clean", "/api/columns", "/api/form/yaml",
               "/api/form/values", "/api/run/r1/push", "/api/run/r1/label", "/api/run/r1/label/retrain",
               "/api/run/r1/label/next")
NOT_OBJECTS = ([1, 2], ["train.csv"], [], "train.csv", 3, 2.5, None, True)


def test_a_json_body_that_is_not_an_object_gets_422(dash):
    c = _dash_client(dash)
    for url in JSON_ROUTES:
        for body in NOT_OBJECTS:
            r = c.post(url, json=body, headers=POST)
            assert r.status_code == 422 and isinstance(r.json()["detail"], str), (url, body, r.status_code, r.text)
        for raw in (b"{not json", b"", b"\xff\xfe"):
            r = c.post(url, content=raw, headers={**POST, "Content-Type": "application/json"})
            assert r.status_code == 422, (url, raw, r.status_code, r.text)
    wrong = {"/api/clean": {"path": "train.csv", "actions": [{"line": "x", "action": "drop"}, 5]},
             "/api/jobs": {"config": "data:\n  split: [a, b, c]\n"}}
    relabel = {"path": "train.csv", "actions": [{"line": 2, "action": "relabel", "label": "z"}], "label_column": "nolabel"}
    assert c.post("/api/clean", json=relabel, headers=POST).status_code == 422
    for url, body in wrong.items():  # the right shape with wrong values inside: 422 too
        assert c.post(url, json=body, headers=POST).status_code == 422
    body_routes = {r.path.replace("{name}", "r1") for r in c.app.routes if getattr(r, "body_field", None) is not None}
    assert body_routes == set(JSON_ROUTES)  # every JSON-body route in the table is checked here


def _json_values():
    import hypothesis.strategies as st
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                                max_size=4), max_leaves=12)


def _never_5xx(c: TestClient, url: str, bodies) -> None:
    import hypothesis

    @hypothesis.given(body=bodies)
    @hypothesis.settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck))
    def check(body):
        r = c.post(url, json=body, headers=POST)
        assert r.status_code < 500, (url, body, r.text)
    check()


def test_arbitrary_json_to_every_json_route_never_gives_a_server_error(dash):
    """The property test: any JSON value, or an object with the routes' own keys holding any JSON value."""
    import hypothesis.strategies as st
    c = _dash_client(dash)
    keys = st.sampled_from(["path", "actions", "config", "text", "pair", "task", "label_column", "line", "action",
                            "values", "to"])
    for url in JSON_ROUTES:
        _never_5xx(c, url, _json_values() | st.dictionaries(keys, _json_values(), max_size=4))
    c.app.state.ui.jobs.close()


def test_fuzzing_the_dashboard_openapi_schema_gives_no_5xx(dash):
    app = create_ui(UiSettings(runs_dir=str(dash["work"] / "runs"), workdir=str(dash["work"]), max_upload_bytes=4096))
    calls = [code for _, code in fuzz_openapi(app, ({**POST, "Host": "127.0.0.1:7860"},), 25,
                                              {"/api/jobs", "/api/clean", "/api/init", "/api/run/{name}/predict", "/",
                                               "/api/form/yaml", "/api/form/values", "/api/columns",
                                               "/api/jobs/{job_id}/metrics", "/api/run/{name}/export"},
                                              schema_headers={"Host": "127.0.0.1:7860"})]
    app.state.ui.jobs.close()
    assert len(calls) >= 100 and 200 in calls and 422 in calls
