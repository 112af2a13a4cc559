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
            "Curves by status", "Trial explorer", "Claims", "Cell summary", "Metric tables",
            "Diagnostics", "Environment and files"]
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                                 width: i.naturalWidth}));
  const headings = [...document.querySelectorAll("h2")].map(h => h.textContent.trim());
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  const shown = [...document.images].map(i => ({alt: i.alt, natural: i.naturalWidth,
                                                 shown: i.getBoundingClientRect().width}));
  const findings = document.getElementById("findings").getBoundingClientRect().top;
  const explorer = document.getElementById("trial-explorer");
  const before = {trial: explorer.dataset.trial,
                  charts: explorer.querySelectorAll("svg").length,
                  paths: explorer.querySelectorAll("svg polyline, svg polygon").length};
  // Pick teacher_mlp, sgd, lr 0.1, batch 32, seed 1 by its axis values, as a reader would.
  const want = {"task": "teacher_mlp", "optimizer": "sgd", "optimizer.lr": "0.1",
                "train.batch_size": "32", "seed": "1"};
  for (const select of explorer.querySelectorAll("select[data-axis]")) {
    const option = [...select.options].find(o => o.textContent === want[select.dataset.axis]);
    select.value = option.value;
    select.dispatchEvent(new Event("change"));
  }
  const after = {trial: explorer.dataset.trial,
                 status: explorer.querySelector("[data-role=status]").textContent,
                 divergence: explorer.querySelectorAll("[data-role=divergence]").length,
                 final: explorer.querySelector("[data-metric=val_loss_final]").textContent,
                 charts: explorer.querySelectorAll("svg").length,
                 wide: [...explorer.querySelectorAll("svg, dl")].map(
                   e => e.getBoundingClientRect().right)};
  const payload = document.getElementById("explorer-data").textContent.length;
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images, headings, fetched, shown, findings, before,
                                    after, payload,
                                    page: document.body.getBoundingClientRect().right});
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
    result = chromium("--dump-dom", "--window-size=1400,2000", f"--log-net-log={netlog}",
                      probed.as_uri(),
                      profile=work / "profile-dom")
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no probe output; chromium stderr:\n{result.stderr[-2000:]}"
    shot = work / "screenshot.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,2000", full_report.as_uri(),
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


def test_findings_are_on_the_first_screen(page):
    assert page["probe"]["findings"] < 300  # px from the top, at 1400 x 2000


def test_no_figure_is_shrunk_to_fit_the_page(page):
    # A figure shown narrower than it was drawn has smaller text than it was drawn with.
    shrunk = [i for i in page["probe"]["shown"] if i["shown"] < i["natural"] - 1]
    assert not shrunk


def test_the_explorer_shows_the_trial_picked_by_its_axes(page):
    probe = page["probe"]
    assert probe["before"]["charts"] == 2 and probe["before"]["paths"] >= 3
    after = probe["after"]
    # conftest.status_of: sgd at lr 0.1 and batch 32 diverges (its final loss is the
    # initial one, 2.0 x 1.1 for seed 1); the first trial shown is another one.
    assert after["status"] == "diverged" and after["trial"] != probe["before"]["trial"]
    assert after["divergence"] == 2  # a dotted line on both charts
    assert after["final"] == "2.2" and after["charts"] == 2
    assert max(after["wide"]) <= probe["page"]  # nothing wider than the column


def test_the_explorer_payload_is_small(page, full_report):
    from tests.analysis.conftest import _trial_rows

    per_trial = page["probe"]["payload"] / len(_trial_rows())
    assert per_trial < 1024  # 11-step fixture curves: ~0.4 KiB a trial
