"""The dashboard's labeling flow in a real headless Chromium (issue 48): a batch shown with the model's suggestions,
accepted or corrected row by row, the retrain started from the page as a job, the learning curve gaining the
retrained run's point, and the next batch asking about other rows.

Chromium is Debian's chromium + chromium-driver through Selenium, started as tests/test_ui.py starts it (installed
with apt-get where we are root on a Debian-like machine; elsewhere the test is skipped, saying why). A tiny random
BERT keeps the two trainings (the first run and the retrain) to seconds.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

import lmtune
from lmtune import active
from lmtune.ui.app import UiSettings
from tests.conftest import toy_rows, write_csv
from tests.test_ui import _screenshot, _wait, browser, serving  # noqa: F401  (browser: the fixture)

BATCH = 4


@pytest.fixture(scope="module")
def labeling(tmp_path_factory, tiny_model) -> dict:
    """A finished run (toy sentiment, tiny random BERT), a pool of unlabeled rows and a first batch asked of it."""
    d = tmp_path_factory.mktemp("ui-label")
    train = write_csv(d / "train.csv", toy_rows(40, 1))
    pool = write_csv(d / "pool.csv", [(t,) for t, _ in toy_rows(30, 7)], header=("text",))
    lmtune.train({"output_dir": str(d / "runs"), "run_name": "seed", "data": {"train": str(train), "max_length": 32},
                  "model": {"name": tiny_model},
                  "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "progress": "none", "seed": 1}})
    first = active.query(d / "runs" / "seed", pool, BATCH, "entropy", "csv")
    return {"dir": d, "pool": pool, "first": first}


@pytest.fixture(scope="module")
def server(labeling):
    """The dashboard over the folder (uvicorn in a thread), as `lmtune ui` serves it."""
    d = labeling["dir"]
    with serving(UiSettings(runs_dir=str(d / "runs"), workdir=str(d))) as url:
        yield url


def _rows(browser) -> list:
    from selenium.webdriver.common.by import By
    return browser.find_elements(By.CSS_SELECTOR, "#label-rows tbody tr")


def _curve(browser) -> list[tuple[str, int]]:
    """The learning-curve table on the labeling page: (run, labeled train rows) per point."""
    from selenium.webdriver.common.by import By
    cells = [r.find_elements(By.TAG_NAME, "td") for r in browser.find_elements(By.CSS_SELECTOR, "h2 + table tbody tr")]
    return [(c[0].text, int(c[1].text)) for c in cells]


def _job(url: str, job_id: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=10) as r:
        return json.loads(r.read())


def test_label_a_batch_retrain_and_the_curve_gains_a_point_then_the_next_batch_differs(browser, server, labeling):
    from selenium.webdriver.common.by import By
    d, first = labeling["dir"], labeling["first"]
    browser.get(server + "/run/seed")
    browser.find_element(By.ID, "label-link").click()
    _wait(browser, lambda b: "label" in b.title)
    rows = _rows(browser)
    assert [r.get_attribute("data-rank") for r in rows] == [str(k) for k in range(1, BATCH + 1)]
    assert [r.find_element(By.CSS_SELECTOR, "td.text").text.splitlines()[0] for r in rows] == [x["text"] for x in first["rows"]]
    before = _curve(browser)
    assert before == [("seed", active.read_state(d / "runs" / "seed")["curve"][0]["labels"])]

    # accept the first rows' suggestions; correct the last one by typing the other label
    for row in rows[:-1]:
        row.find_element(By.CSS_SELECTOR, "button.accept").click()
    other = "neg" if first["rows"][-1]["suggestion"] == "pos" else "pos"
    box = rows[-1].find_element(By.CSS_SELECTOR, "input.label-value")
    box.clear()
    box.send_keys(other)
    rows[-1].find_element(By.CSS_SELECTOR, "button.save").click()
    expected = {**{r["rank"]: [r["suggestion"]] for r in first["rows"][:-1]}, BATCH: [other]}
    _wait(browser, lambda b: active.loop.saved_labels(d / "runs" / "seed", first["index"]) == expected, 30)
    browser.refresh()  # the saved labels are the page's own after a reload
    _wait(browser, lambda b: b.find_element(By.ID, "label-saved").text == str(BATCH))
    assert [r.find_element(By.CSS_SELECTOR, "input.label-value").get_attribute("value") for r in _rows(browser)] == \
        [expected[k][0] for k in range(1, BATCH + 1)]
    _screenshot(browser, "label-batch")

    browser.find_element(By.ID, "retrain").click()
    status = _wait(browser, lambda b: b.find_element(By.ID, "label-status").text.startswith("retraining: job")
                   and b.find_element(By.ID, "label-status").text, 30)
    job_id = status.split("job ", 1)[1].split()[0]
    deadline = time.time() + 300
    while (job := _job(server, job_id))["status"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    log = d / ".lmtune-ui" / "jobs" / job_id / "train.out"  # the job's output, where the dashboard keeps it
    assert job["status"] == "finished", log.read_text()[-3000:] if log.is_file() else job

    # the retrained run is an ordinary run: on the runs page, with its labeling page and the grown curve
    browser.get(server + "/")
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#runs tr[data-run='seed-al1']"))
    browser.find_element(By.CSS_SELECTOR, "#runs tr[data-run='seed-al1'] a").click()
    _wait(browser, lambda b: "seed-al1" in b.title)
    browser.find_element(By.ID, "label-link").click()
    _wait(browser, lambda b: "label" in b.title)
    after = _curve(browser)
    assert after[:1] == before and [run for run, _ in after] == ["seed", "seed-al1"]
    assert after[1][1] == before[0][1] + BATCH  # the corrected row went in with the accepted ones
    plot = browser.find_element(By.ID, "label-curve")
    _wait(browser, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", plot) > 0, 30)
    grown = Path(active.read_state(d / "runs" / "seed")["imports"][-1]["train_file"]).read_text(encoding="utf-8")
    assert f"{first['rows'][-1]['text']},{other}" in grown  # the correction, not the suggestion, was trained on

    # the loop goes on from the retrained run, asked from the page: the pool and the batch size are the last batch's,
    # and the next batch (a job; the page reloads with it) asks about other rows
    assert browser.find_element(By.ID, "next-pool").get_attribute("value") == str(Path(labeling["pool"]).resolve())
    assert browser.find_element(By.ID, "next-size").get_attribute("value") == str(BATCH)
    browser.find_element(By.ID, "next-batch").click()
    _wait(browser, lambda b: "Batch 2" in b.find_element(By.ID, "label-batch").text, 120)
    texts = [r.find_element(By.CSS_SELECTOR, "td.text").text.splitlines()[0] for r in _rows(browser)]
    assert len(texts) == BATCH and not set(texts) & {r["text"] for r in first["rows"]}
    assert browser.find_element(By.ID, "label-saved").text == "0"
    _screenshot(browser, "label-next-batch")


def test_asking_for_a_batch_checks_the_pool_and_the_strategy_before_any_job(server, labeling, tmp_path):
    from urllib.error import HTTPError

    def ask(body: dict) -> tuple[int, str]:
        req = urllib.request.Request(f"{server}/api/run/seed/label/next", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "X-Lmtune-UI": "1"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except HTTPError as e:
            return e.code, e.read().decode()
    outside = tmp_path / "pool.csv"  # not under the dashboard's working directory
    outside.write_text("text\nhello\n")
    assert ask({"pool": str(outside), "size": 2})[0] == 403
    assert ask({"pool": "no-such-pool.csv", "size": 2})[0] == 404
    code, body = ask({"size": 2, "strategy": "psychic"})
    assert code == 422 and "choose from" in body and "entropy" in body
    assert ask({"size": 0})[0] == 422
    # a job already working on the run (a double click): the second ask is refused, not run beside it
    first = ask({"size": 2})
    assert first[0] == 200, first
    code, body = ask({"size": 2})
    assert code == 409 and "already running" in body
    job_id = json.loads(first[1])["id"]
    deadline = time.time() + 300
    while _job(server, job_id)["status"] == "running" and time.time() < deadline:
        time.sleep(0.5)
    jobs = labeling["dir"] / ".lmtune-ui" / "jobs"
    assert all("psychic" not in p.read_text() for p in jobs.glob("*/train.out"))
