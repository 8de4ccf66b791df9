"""Open a local HTML file in Debian's headless Chromium (through its chromedriver) and report what
a person would see: console errors, each figure's drawn SVG, and a screenshot.

scripts/test.sh installs chromium and chromium-driver where they are missing.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

# per figure div: how many plot SVGs plotly drew, how many marks (bars, lines, heatmap images) it holds
_FIGURES_JS = """
return Array.from(document.querySelectorAll('div.figure .plotly-graph-div')).map(d => ({
  id: d.id,
  svgs: d.querySelectorAll('svg.main-svg').length,
  marks: d.querySelectorAll('g.trace path, g.trace image, g.heatmaplayer image, g.points path').length,
  width: d.getBoundingClientRect().width,
  height: d.getBoundingClientRect().height}));
"""


@dataclass
class PageView:
    console: list[dict]     # every console message: {"level", "message"}
    figures: list[dict]     # per figure: id, svgs, marks, width, height
    screenshot: Path

    @property
    def errors(self) -> list[dict]:
        return [m for m in self.console if m["level"] == "SEVERE"]


def view_page(page: Path, screenshot: Path, *, width: int = 1400, height: int = 1000,
              settle_s: float = 20.0) -> PageView:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        raise RuntimeError("chromium and chromedriver are needed (apt-get install chromium chromium-driver; "
                           "scripts/test.sh does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(page.resolve().as_uri())
        figures = _wait_for_figures(driver, settle_s)
        driver.save_screenshot(str(screenshot))
        console = [{"level": e["level"], "message": e["message"]} for e in driver.get_log("browser")]
        return PageView(console, figures, screenshot)
    finally:
        driver.quit()


def _wait_for_figures(driver, settle_s: float) -> list[dict]:
    """Plotly draws asynchronously: poll until every figure holds its SVG, or time runs out."""
    deadline = time.time() + settle_s
    while True:
        figures = driver.execute_script(_FIGURES_JS)
        if (figures and all(f["svgs"] for f in figures)) or time.time() > deadline:
            return figures
        time.sleep(0.25)
