"""Headless Chromium (Debian's `chromium`, driven by Playwright through its executable path) with a
fake camera opens `/`, starts streaming, and the output <video> shows decoded, non-blank frames.
A screenshot is saved to artifacts/browser.png. `.ci/run` installs chromium."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from gateway_helpers import running_server, sessions_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

# Pixel statistics of the output video, drawn onto a canvas in the page.
OUTPUT_STATS_JS = """() => {
  const v = document.getElementById("output");
  if (!v || v.videoWidth === 0 || v.readyState < 2) return null;
  const c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext("2d");
  g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let n = 0, sum = 0, sq = 0;
  for (let i = 0; i < d.length; i += 4) { const y = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += y; sq += y * y; n++; }
  const mean = sum / n;
  return { width: c.width, height: c.height, mean, std: Math.sqrt(sq / n - mean * mean), time: v.currentTime };
}"""


async def _run() -> dict:
    from playwright.async_api import async_playwright

    async with running_server(token=None) as (url, app), async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            ],
        )
        try:
            page = await browser.new_page()
            await page.goto(url + "/")
            await page.click("#start")
            stats = None
            for _ in range(240):  # poll up to ~120 s on a busy 2-CPU machine
                stats = await page.evaluate(OUTPUT_STATS_JS)
                if stats and stats["time"] > 0.5:
                    break
                await asyncio.sleep(0.5)
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "browser.png"))
            message = await page.inner_text("#message")
            overlay = await page.inner_text("#overlay")
            await page.click("#stop")
            for _ in range(40):
                if not sessions_of(app).sessions:
                    break
                await asyncio.sleep(0.25)
            return {"stats": stats, "message": message, "overlay": overlay, "left": len(sessions_of(app).sessions)}
        finally:
            await browser.close()


def test_browser_streams_webcam_and_shows_decoded_output():
    result = asyncio.run(_run())
    stats = result["stats"]
    assert stats is not None, f"no output video; page said: {result['message']!r}"
    assert (stats["width"], stats["height"]) == (64, 48)  # the engine's frame size
    assert stats["time"] > 0.5  # playing, not a single frame
    assert stats["std"] > 5.0, stats  # a picture, not a blank or constant frame
    assert result["left"] == 0  # Stop closed the session on the server
