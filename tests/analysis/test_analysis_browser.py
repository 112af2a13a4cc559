"""The report in a real browser: headless Chromium renders it, every image decodes, nothing
is fetched from the network, every section heading is there, and a screenshot is taken.

A small probe script is injected into a COPY of the report (the report itself carries no
script, and its Content-Security-Policy forbids scripts, so the copy's policy also allows
inline scripts): after load it writes what the page saw into the DOM, which
`--dump-dom` returns. A network log (`--log-net-log`) records every request Chromium makes.
Skipped when no Chromium binary is installed (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which(n) for n in
                             ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary installed")

HEADINGS = ["Findings", "Sweep", "Stability map", "Learning-rate sensitivity", "Loss curves",
            "Curves by status", "Claims", "Cell summary", "Metric tables", "Diagnostics",
            "Environment and files"]
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                                 width: i.naturalWidth}));
  const headings = [...document.querySelectorAll("h2")].map(h => h.textContent.trim());
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images, headings, fetched});
  document.body.appendChild(out);
});
</script>
"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions",
               f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


def with_probe(html: str) -> str:
    html = html.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    return html.replace("</body>", PROBE + "</body>")


@pytest.fixture(scope="module")
def page(full_report: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("browser")
    probed = work / "report.html"
    probed.write_text(with_probe(full_report.read_text()))
    netlog = work / "netlog.json"
    result = chromium("--dump-dom", f"--log-net-log={netlog}", probed.as_uri(),
                      profile=work / "profile-dom")
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no probe output; chromium stderr:\n{result.stderr[-2000:]}"
    shot = work / "screenshot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", full_report.as_uri(),
             profile=work / "profile-shot")
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    return {"probe": probe, "netlog": netlog.read_text() if netlog.exists() else "",
            "screenshot": shot}


def test_every_image_decodes(page):
    images = page["probe"]["images"]
    assert len(images) >= 10
    assert all(i["complete"] and i["width"] > 0 for i in images), images


def page_requests(netlog: str) -> list[str]:
    """Network URLs the page asked for. Chromium's own background requests (update checks,
    time sync) carry the initiator "not an origin"; a page's requests carry its origin."""
    if not netlog:
        return []
    log = json.loads(netlog)
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"].get("url", "") for e in log["events"]
            if e["type"] == start and e["params"].get("initiator") != "not an origin"
            and e["params"].get("url", "").startswith(("http:", "https:", "ws:", "wss:"))]


def test_nothing_is_fetched_from_the_network(page):
    assert page["probe"]["fetched"] == []
    assert page_requests(page["netlog"]) == []


def test_network_check_sees_a_page_request(tmp_path):
    # Control: the same check does catch a page that fetches something.
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/x.png">')
    netlog = tmp_path / "netlog.json"
    chromium("--dump-dom", f"--log-net-log={netlog}", control.as_uri(),
             profile=tmp_path / "profile")
    assert page_requests(netlog.read_text()) == ["http://127.0.0.1:9/x.png"]


def test_every_section_heading_is_present(page):
    assert page["probe"]["headings"] == HEADINGS


def test_screenshot_is_a_png(page):
    data = page["screenshot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
