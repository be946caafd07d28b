"""Walks the dashboard's main path in headless Chromium (Debian's, through Playwright).

usage: walk.py BASE_URL TOKEN SCREENSHOT_DIR

Enters the token, triggers a run from the page and watches it go live to passed, opens it
and finds its three steps with passed_after_ms, rolls the plugin back to its other version,
pauses the schedule, and looks at the health page; a screenshot of each page goes to
SCREENSHOT_DIR. Any console error or uncaught exception fails the walk.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

BASE, TOKEN, SHOTS = sys.argv[1:4]
TIMEOUT = 30_000


def main() -> int:
    errors = []
    try:
        return walk(errors)
    finally:
        if errors:
            print("\n".join(errors))


def walk(errors) -> int:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
        expect.set_options(timeout=TIMEOUT)

        # The token, entered once.
        page.goto(f"{BASE}/")
        expect(page.get_by_text("This server needs an API token")).to_be_visible()
        page.fill("#token", TOKEN)
        page.click("#token-save")
        expect(page.locator("#token-state")).to_have_text("token set")

        # Trigger a run; it goes live to passed without a reload.
        expect(page.locator("#trigger-plugin option[value=misbehave]")).to_have_count(1)
        page.select_option("#trigger-plugin", "misbehave")
        page.fill("#trigger-params", "{}")
        page.click("#trigger")
        row = page.locator("#runs tbody tr").first
        expect(row.locator(".status")).to_have_text("passed")
        page.screenshot(path=os.path.join(SHOTS, "runs.png"), full_page=True)

        # The run: three steps, each passed after some time.
        row.locator("a").click()
        expect(page.locator(".timeline .step")).to_have_count(3)
        expect(page.locator(".timeline .step .passed-after")).to_have_count(3)
        expect(page.locator("#attempts tbody tr")).to_have_count(3)
        page.screenshot(path=os.path.join(SHOTS, "run.png"), full_page=True)

        # Roll the plugin back to its other version.
        page.click("nav a[href='/plugins']")
        plugin = page.locator("section[data-plugin=misbehave]")
        expect(plugin.locator("button.activate")).to_have_count(1)
        inactive = plugin.locator("tr:has(button.activate)").get_attribute("data-version")
        plugin.locator("button.activate").click()
        expect(plugin.locator(f"tr[data-version='{inactive}'] .active")).to_have_text("active")
        page.screenshot(path=os.path.join(SHOTS, "plugins.png"), full_page=True)

        # Pause the schedule.
        page.click("nav a[href='/schedules']")
        schedule = page.locator("#schedules tbody tr").first
        expect(schedule.locator(".state")).to_have_text("active")
        schedule.locator("button.pause").click()
        expect(page.locator("#schedules tbody tr").first.locator(".state")).to_have_text("paused")
        page.screenshot(path=os.path.join(SHOTS, "schedules.png"), full_page=True)

        # Health: this node, with the calls it made.
        page.click("nav a[href='/health']")
        expect(page.locator("#nodes tbody tr")).not_to_have_count(0)
        page.screenshot(path=os.path.join(SHOTS, "health.png"), full_page=True)

        browser.close()
    if errors:
        return 1
    print(f"walked the dashboard; screenshots in {SHOTS}")
    print(f"rolled back to {inactive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
