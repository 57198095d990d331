#!/usr/bin/env python3
"""Open a kdistill report.html in headless Chromium, check that it renders, screenshot it.

    apt-get install -y chromium            # Debian/Ubuntu; or any Chrome/Chromium on PATH
    python scripts/render_report.py runs/quickstart/report.html --screenshot docs/report.png

Checks, in the browser: every table has rendered rows, every image has loaded (its decoded
width is non-zero), and the page wrote nothing to the console (no errors, no failed
resource). The counts must equal those of the page's source (tests/html_check.py,
which also checks that the page is self-contained). Exits 1 on any problem.

The checker script is added to a temporary copy of the page; the report itself carries no
script.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.html_check import check_html  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PROBE = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const tables = [...document.querySelectorAll("table")];
  const result = {
    images: images.length,
    images_loaded: images.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0).length,
    tables: tables.length,
    tables_rendered: tables.filter(t => t.rows.length > 1 && t.getBoundingClientRect().height > 0).length,
    rows: document.querySelectorAll("tr").length,
    height: Math.ceil(document.documentElement.scrollHeight),
  };
  const pre = document.createElement("pre");
  pre.id = "kdistill-probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found on PATH; install it (Debian/Ubuntu: apt-get install -y chromium)")


def chromium(exe: str, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=180)


def console_messages(stderr: str) -> list[str]:
    """Console output and failed loads that Chromium logs for the page."""
    return [line for line in stderr.splitlines() if re.search(r"CONSOLE|Failed to load resource|Refused to", line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="report.html")
    parser.add_argument("--screenshot", type=Path, help="write a full-page PNG screenshot here")
    parser.add_argument("--width", type=int, default=1400, help="window width in CSS pixels (default 1400)")
    parser.add_argument("--max-height", type=int, default=16000, help="screenshot at most this tall (default 16000)")
    args = parser.parse_args()

    text = args.report.read_text()
    expected = check_html(text)  # well formed and self-contained, or an error
    exe = browser()
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        probe_page = Path(tmp) / "probe.html"
        probe_page.write_text(text.replace("</body>", PROBE + "</body>"))
        run = chromium(
            exe, "--virtual-time-budget=10000", f"--window-size={args.width},1000", "--dump-dom", probe_page.as_uri()
        )
        found = re.search(r'<pre id="kdistill-probe">(.*?)</pre>', run.stdout)
        if not found:
            print(run.stderr[-2000:], file=sys.stderr)
            sys.exit(f"Chromium did not render {args.report} (exit status {run.returncode})")
        seen = json.loads(found.group(1).replace("&quot;", '"'))
        problems += [f"console: {m}" for m in console_messages(run.stderr)]
        # a page without scripts writes to the console only for errors; check the page alone too
        plain = chromium(
            exe,
            "--virtual-time-budget=10000",
            f"--window-size={args.width},1000",
            "--dump-dom",
            args.report.resolve().as_uri(),
        )
        problems += [f"console: {m}" for m in console_messages(plain.stderr)]
    if seen["images_loaded"] != expected["images"] or seen["images"] != expected["images"]:
        problems.append(f"{seen['images_loaded']} of {expected['images']} images rendered")
    if seen["tables_rendered"] != expected["tables"] or seen["rows"] != expected["rows"]:
        problems.append(
            f"{seen['tables_rendered']} of {expected['tables']} tables rendered ({seen['rows']} of {expected['rows']} rows)"
        )
    print(
        f"{args.report}: {seen['tables_rendered']}/{expected['tables']} tables ({seen['rows']} rows), "
        f"{seen['images_loaded']}/{expected['images']} images rendered, page height {seen['height']} px, "
        f"{len(console_messages(run.stderr)) + len(console_messages(plain.stderr))} console messages"
    )
    if args.screenshot:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        height = min(seen["height"], args.max_height)
        shot = chromium(
            exe,
            f"--window-size={args.width},{height}",
            f"--screenshot={args.screenshot.resolve()}",
            args.report.resolve().as_uri(),
        )
        if shot.returncode != 0 or not args.screenshot.is_file():
            problems.append(f"screenshot failed: {shot.stderr[-500:]}")
        else:
            print(f"screenshot: {args.screenshot} ({args.width}x{height})")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
