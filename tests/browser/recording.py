"""Walks a recorded run's page in headless Chromium.

usage: recording.py BASE_URL SCREENSHOT_DIR RUN_ID

RUN_ID failed at its second step after an HTTP call in its first, and was recorded. Its page
shows the recorded exchanges per attempt, collapsed; opening the first attempt and its call
shows the request and the response; "Download recording" saves RUN_ID.rec, the recording the
API serves. A screenshot of the section goes to SCREENSHOT_DIR (recording.png). Any console
error or uncaught exception fails the walk.
"""

import json
import os
import sys

from playwright.sync_api import expect, sync_playwright

BASE, SHOTS, RUN = sys.argv[1:4]
TIMEOUT = 30_000


def main() -> int:
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        expect.set_options(timeout=TIMEOUT)
        page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
        page.goto(f"{BASE}/runs/{RUN}")
        section = page.locator("#recording")
        expect(section).to_be_visible()
        attempts = section.locator("details.recorded-attempt")
        expect(attempts).to_have_count(2)
        # Collapsed by default: nothing of a call shows until it is opened.
        first = attempts.nth(0)
        expect(first).not_to_have_attribute("open", "")
        expect(first.locator(":scope > summary")).to_contain_text("1 call")
        call = first.locator("details.recorded-call")
        expect(call).not_to_be_visible()
        first.locator(":scope > summary").click()
        expect(call).to_be_visible()
        expect(call.locator("summary")).to_contain_text("http GET")
        expect(call.locator("summary")).to_contain_text("→ 200")
        call.locator("summary").click()
        expect(call.locator("pre").nth(1)).to_contain_text('"status": 200')
        expect(attempts.nth(1).locator(":scope > summary .status")).to_have_text("failed")
        section.screenshot(path=os.path.join(SHOTS, "recording.png"))
        with page.expect_download() as downloading:
            section.locator("#download-recording").click()
        download = downloading.value
        if download.suggested_filename != f"{RUN}.rec":
            errors.append(f"the download is named {download.suggested_filename}")
        with open(download.path(), encoding="utf-8") as saved:
            first_line = json.loads(saved.readline())
        if first_line.get("recording", {}).get("run_id") != RUN:
            errors.append(f"the download's first line is {first_line}")
        browser.close()
    if errors:
        print("\n".join(errors))
        return 1
    print(f"recording section of {RUN}: two attempts, a call opened, the recording downloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
