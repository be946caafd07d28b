"""Walks a public status page in headless Chromium (Debian's, through Playwright), at a
desktop and a phone width.

usage: status.py PAGE_URL SCREENSHOT_DIR CHECK_NAME

At each width: the page loads without a token, names the check with its state, draws one bar
per day with a hover title, lists the steps' latencies, does not scroll sideways, and swaps in
a fresh copy of itself when it refreshes; a full-page screenshot of each width goes to
SCREENSHOT_DIR (status-wide.png, status-narrow.png). Then the same page with JavaScript off
shows the same content. Any console error or uncaught exception fails the walk.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

URL, SHOTS, CHECK = sys.argv[1:4]
TIMEOUT = 30_000
WIDTHS = {"wide": (1280, 900), "narrow": (390, 844)}


def main() -> int:
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        expect.set_options(timeout=TIMEOUT)
        for name, (width, height) in WIDTHS.items():
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda message: errors.append(f"{name} console: {message.text}") if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"{name} page error: {error}"))
            page.goto(URL)
            check = page.locator("article.check").filter(has_text=CHECK)
            expect(check).to_have_count(1)
            expect(check.locator(".pill")).to_be_visible()
            bars = check.locator("svg.bars rect.day")
            days = bars.count()
            assert days >= 30, f"{name}: {days} bars"
            title = bars.nth(days - 1).locator("title").text_content()
            assert "passed" in title or "failed" in title, f"{name}: today's bar says {title!r}"
            expect(check.locator("table.steps tbody tr").first).to_be_visible()
            scroll = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert scroll <= 0, f"{name}: the page scrolls sideways by {scroll}px"
            # The live refresh replaces the content with the server's newer copy.
            page.evaluate("document.getElementById('status').dataset.stale = 'yes'")
            page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")
            expect(page.locator("main#status:not([data-stale])")).to_have_count(1)
            page.screenshot(path=os.path.join(SHOTS, f"status-{name}.png"), full_page=True)
            print(f"{name}: {days} daily bars, no sideways scroll")
            page.close()
        static = browser.new_context(java_script_enabled=False).new_page()
        static.goto(URL)
        expect(static.locator("article.check").filter(has_text=CHECK)).to_have_count(1)
        expect(static.locator(".banner")).to_be_visible()
        print("without JavaScript: the same checks")
        browser.close()
    if errors:
        print("\n".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
