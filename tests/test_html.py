"""The HTML report: self-contained, escaped, re-renderable, and rendered by a real browser."""

import json
import shutil

import pytest
from click.testing import CliRunner

from varprop.cli import main

TITLE = "<script>alert(1)</script> & <b>co</b>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "run"
    result = CliRunner().invoke(main, ["simulate", "--layers", "24", "--width", "32", "--samples", "64",
                                       "--init", "he", "--init", "fan_in", "--activation", "relu", "--replicates", "3",
                                       "--backward", "--title", TITLE, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_html_is_self_contained_and_escaped(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;co&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 4 and "position: sticky" in page and 'class="toc"' in page
    assert "prefers-color-scheme: dark" in page and "@media print" in page


def test_format_option_and_report_command(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("report.md", "report.html", "std_per_layer.png", "means_per_layer.png", "correlation_per_layer.png",
                 "histograms.png"):
        (copy / name).unlink()
    result = CliRunner().invoke(main, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").exists() and (copy / "report.md").read_text() == (run_dir / "report.md").read_text()
    only_md = tmp_path / "md"
    r = CliRunner().invoke(main, ["simulate", "--layers", "3", "--width", "8", "--samples", "8", "--format", "md",
                                  "--out", str(only_md)])
    assert r.exit_code == 0
    figures = {f"{name}.{ext}" for name in ("std_per_layer", "means_per_layer", "correlation_per_layer", "histograms")
               for ext in ("png",)}
    assert {p.name for p in only_md.iterdir()} == {".varprop-manifest.json", "report.md", "layers.csv", "config.json",
                                                   "histograms.csv", *figures}
    bad = CliRunner().invoke(main, ["simulate", "--format", "pdf"])
    assert bad.exit_code == 2 and "--format" in bad.stderr
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "RUN_DIR" in missing.stderr


@pytest.mark.parametrize("subsections, folded", [(8, False), (9, True)])
def test_contents_fold_many_subsections(tmp_path, subsections, folded):
    """A section with more subsections than TOC_OPEN (one per configuration of a large comparison) lists
    them under a closed <details>, so the findings stay near the top of the page."""
    from varprop.report.document import TOC_OPEN, Document, to_html

    doc = Document("t")
    doc.h2("Findings")
    doc.h2("Per-layer statistics")
    for i in range(subsections):
        doc.h3(f"config {i}")
    nav = to_html(doc, tmp_path).split("<nav", 1)[1].split("</nav>", 1)[0]
    assert nav.count('class="l3"') == subsections and TOC_OPEN == 8
    assert ("<details><summary>9 subsections</summary>" in nav) == folded and nav.count("<details") == folded


def test_findings_come_first(run_dir):
    md = (run_dir / "report.md").read_text()
    assert md.index("## Findings") < md.index("## Summary") < md.index("## Per-layer statistics")
    assert "**he**: the inputs collapse onto one direction" in md and "**fan_in**: the signal dies at layer" in md


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless Chromium and chromedriver on this machine (CI installs Debian's chromium "
                    "and chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extras")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


def test_real_browser_renders_the_report(run_dir, tmp_path):
    browser = _browser()
    try:
        browser.get((run_dir / "report.html").resolve().as_uri())
        sizes = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width,"
            " i.getBoundingClientRect().height]);")
        assert sizes and all(c and nw > 0 and w > 0 and h > 0 for c, nw, w, h in sizes), sizes
        assert browser.title.startswith("<script>")  # the title is text, not markup
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
        assert all(u.startswith(("file:", "data:")) for u in urls), urls
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()
