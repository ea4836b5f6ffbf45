"""The docs site: `mkdocs build --strict` passes offline (broken links, pages missing from the nav and
docstrings that do not render fail it), the benchmark tables come from bench/results/*.json, and the
README stays a front page that starts with the two set-up commands."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import benchmarks  # noqa: E402  (the mkdocs hook, a plain module)
from mkdocs.exceptions import PluginError  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once, as CI builds it: strict, into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_the_site_builds_strict_with_every_page_and_the_api_reference(site):
    pages = [p.relative_to(ROOT / "docs").with_suffix("") for p in (ROOT / "docs").rglob("*.md")]
    for page in pages:  # every Markdown page became an HTML page (none dropped from the nav)
        html = site / (page.parent if page.name == "index" else page) / "index.html"
        assert html.is_file(), page
    run_ref = (site / "api" / "run" / "index.html").read_text()
    for member in ("lmtune.inference.Run.predict", "lmtune.inference.Run.evaluate"):  # rendered from the docstrings
        assert f'id="{member}"' in run_ref, member
    assert 'id="lmtune.api.train"' in (site / "api" / "api" / "index.html").read_text()
    home = (site / "index.html").read_text()
    assert "fine-tunes the packaged all-MiniLM-L6-v2" in home and 'href="tasks/ner/"' in home  # the README, its links made site links
    assert (site / "img" / "ui-run.png").is_file() and (site / "img" / "ui-compare.png").is_file()
    dashboard = (site / "dashboard" / "index.html").read_text()
    assert "ui-run.png" in dashboard and "ui-compare.png" in dashboard
    for shot in ("ui-train-form", "ui-live", "ui-reliability", "ui-errors"):  # the dashboard's views, issue 52
        assert f"{shot}.png" in dashboard and (site / "img" / f"{shot}.png").is_file(), shot
    config = (site / "config" / "index.html").read_text()  # the keys table, rendered from the fields by a hook
    assert "<!-- config:keys -->" not in config and "<code>train.calibrate</code>" in config and "folded" in config
    assert not (site / "hooks").exists()
    for html in site.rglob("*.html"):  # the site reads offline: no script, stylesheet or font from elsewhere
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', html.read_text()), html


def test_the_benchmark_page_shows_every_results_file(site):
    page = (site / "benchmarks" / "index.html").read_text()
    assert "<!-- bench:" not in page
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        assert f'id="{doc["bench"]}"' in page and doc["commit"] in page and doc["command"] in page, path.name
        for table in (s["table"] for s in doc["sections"] if "table" in s):
            for row in table["rows"]:  # each measured number is a cell, with its column's decimals
                cells = [benchmarks.format_cell(v, c.get("decimals")) for v, c in zip(row, table["columns"])
                         if isinstance(v, (int, float))]
                assert all(f"<td>{c}</td>" in page for c in cells), (path.name, row)
    assert "18.93x" in (site / "gpu" / "index.html").read_text()  # gpu.md embeds its bench's figures too


def test_the_results_files_render_the_figures_as_they_were_stated():
    results = benchmarks.load_results(RESULTS)
    assert len(results) >= 20
    pairs = benchmarks.render_bench(results["pairs"])
    # stored as numbers with their column's decimals: the trailing zero of 0.8580 is kept
    assert "| MRPC (3,669 train, 407 dev, 1,725 test), MiniLM | accuracy / F1 | 0.7919 / 0.8580 |" in pairs
    classification = benchmarks.render_bench(results["classification"])
    assert "| SST-2 (4,000 train, dev) | 0.8383 | 0.7901 | 33.3 | 64.3 | 0.52x |" in classification
    table = {"columns": [{"name": "a"}, {"name": "b", "decimals": 2}], "rows": [["x", 4.7], ["y", "**2.64**"]]}
    assert benchmarks.render_table(table).splitlines()[2:] == ["| x | 4.70 |", "| y | **2.64** |"]
    overview = benchmarks.render_markers("<!-- bench:overview -->", results, "benchmarks.md")
    assert overview.count("\n|") == len(results) + 1 and "[Classification: lmtune vs the HF Trainer recipe](#classification)" in overview


def test_a_bad_marker_or_results_file_stops_the_build(tmp_path):
    results = benchmarks.load_results(RESULTS)
    with pytest.raises(PluginError, match=r"bench:nope .* names no file bench/results/nope.json; benches: apps, "):
        benchmarks.render_markers("<!-- bench:nope -->", results, "x.md")
    (tmp_path / "a.json").write_text('{"bench": "a",\n "order": }')
    with pytest.raises(PluginError, match=r"a.json: line 2: not valid JSON"):
        benchmarks.load_results(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({**results["ui"], "bench": "b"}))
    with pytest.raises(PluginError, match=r"bench is 'b'; it must be the file's name, 'a'"):
        benchmarks.load_results(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"bench": "a"}))
    with pytest.raises(PluginError, match=r"missing order, title"):
        benchmarks.load_results(tmp_path)


def test_the_readme_is_a_front_page_that_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    assert readme.startswith("# lmtune\n\n```bash\npython3 dev.py demo\npython3 dev.py test\n```\n")
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 30
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing
