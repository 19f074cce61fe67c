"""The HTML report in a real browser: headless Chromium opens it from disk, every image renders, the table is
there and sorts, nothing is logged as an error; a screenshot is taken. Skipped where no Chromium is installed
(Debian: `apt-get install chromium`; .ci/run installs it when it can)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (apt-get install chromium)")

# Put first in <head> of a copy of the page: collects script errors, console.error calls and resources that fail
# to load (capture phase), and after the load event writes what it saw into the DOM as JSON, which --dump-dom prints.
# It also clicks the comparison table's "mIoU mean" header and reports the column's order after the sort.
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (event) {
  var target = event.target || {};
  window.__errors.push(event.message || ("failed to load " + (target.tagName || "?") + " " + String(target.src || "").slice(0, 40)));
}, true);
var __consoleError = console.error;
console.error = function () { window.__errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
                              __consoleError.apply(console, arguments); };
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (image) {
    return {ok: image.complete && image.naturalWidth > 0 && image.naturalHeight > 0, width: image.naturalWidth,
            shown: image.getBoundingClientRect().width, alt: image.alt}; });
  var table = document.querySelector("table.sortable");
  var sorted = null;
  if (table) {
    var header = Array.prototype.find.call(table.tHead.rows[0].cells, function (c) { return c.textContent === "mIoU mean"; });
    if (header) { header.click();
      sorted = Array.prototype.map.call(table.tBodies[0].rows, function (row) { return row.cells[header.cellIndex].textContent; }); }
  }
  var probe = document.createElement("pre");
  probe.id = "segsynth-probe";
  probe.textContent = JSON.stringify({images: images, rows: table ? table.tBodies[0].rows.length : 0,
                                      sorted: sorted, errors: window.__errors});
  document.body.appendChild(probe);
});
</script>"""


def chromium(*arguments: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def probe(page: Path, tmp_path: Path) -> dict:
    """Load `page` (a copy with PROBE injected) from disk in headless Chromium; return what the probe saw."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    result = chromium("--virtual-time-budget=20000", "--dump-dom", probed.resolve().as_uri(),
                      profile=tmp_path / "profile")
    found = re.search(r'<pre id="segsynth-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not report (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
                      .replace("&amp;", "&"))


def test_the_probe_sees_broken_images_and_script_errors(tmp_path):
    """The check below can fail: a broken image and a throwing script are both reported."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>x</title></head><body><img src='data:image/png;base64,AAAA' "
                    "alt='broken'><img src='missing.png' alt='absent'><script>notAFunction();</script></body></html>")
    seen = probe(page, tmp_path)
    assert [image["ok"] for image in seen["images"]] == [False, False]
    assert any("notAFunction" in error for error in seen["errors"]), seen["errors"]
    assert any("failed to load IMG" in error for error in seen["errors"]), seen["errors"]


def test_the_report_renders_in_headless_chromium(compare_run, tmp_path):
    out, results, _ = compare_run
    page = out / "report.html"
    expected_images = len(re.findall(r"<img ", page.read_text()))

    seen = probe(page, tmp_path)
    assert seen["errors"] == []
    assert len(seen["images"]) == expected_images > 30
    broken = [image["alt"] for image in seen["images"] if not image["ok"]]
    assert broken == [], broken
    assert all(image["shown"] > 0 for image in seen["images"])  # laid out, not collapsed (closed <details> aside)
    assert seen["rows"] == len(results["arms"])
    # The table sorted by mIoU mean (ascending on the first click).
    means = [float(value) for value in seen["sorted"]]
    assert means == sorted(means) and len(means) == len(results["arms"])

    # A screenshot of the page (kept where SEGSYNTH_SCREENSHOT says, e.g. results/report_screenshot.png).
    shot = tmp_path / "report.png"
    result = chromium("--window-size=1300,2400", f"--screenshot={shot}", page.resolve().as_uri(),
                      profile=tmp_path / "profile-shot")
    assert shot.is_file(), result.stderr[-2000:]
    picture = np.asarray(Image.open(shot).convert("RGB"))
    assert picture.shape[:2] == (2400, 1300) and picture.std() > 10  # not a blank page
    if os.environ.get("SEGSYNTH_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SEGSYNTH_SCREENSHOT"])
