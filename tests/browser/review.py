"""Walks the dashboard's review of a pending plugin version in headless Chromium.

usage: review.py BASE_URL PUBLISHER_TOKEN ADMIN_TOKEN SCREENSHOT_DIR PLUGIN VERSION

A publisher's upload of PLUGIN (whose grant reaches outside the sandbox) is stored as VERSION
but waits. As the publisher: the plugin page lists VERSION as pending review, with what its
`describe` changes, and offers no way to activate it. As the admin: the same list offers
"Review done: activate", and a click makes VERSION active. A screenshot of each view goes to
SCREENSHOT_DIR. Any console error or uncaught exception fails the walk.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

BASE, PUBLISHER, ADMIN, SHOTS, PLUGIN, VERSION = sys.argv[1:7]
TIMEOUT = 30_000


def main() -> int:
    errors = []
    try:
        return walk(errors)
    finally:
        if errors:
            print("\n".join(errors))


def sign_in(page, token):
    page.goto(f"{BASE}/plugins")
    page.fill("#token", token)
    page.click("#token-save")
    expect(page.locator("#token-state")).to_have_text("token set")


def walk(errors) -> int:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        expect.set_options(timeout=TIMEOUT)
        for who, token in (("publisher", PUBLISHER), ("admin", ADMIN)):
            # A fresh context per token: sessionStorage holds one token per tab.
            context = browser.new_context(viewport={"width": 1360, "height": 900})
            page = context.new_page()
            page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            sign_in(page, token)
            plugin = page.locator(f"section[data-plugin={PLUGIN}]")
            review = plugin.locator(f".pending-review[data-pending='{VERSION}']")
            expect(review).to_have_count(1)
            expect(plugin.locator(f"tr[data-version='{VERSION}'] .status")).to_have_text("pending review")
            expect(review.locator("ul.changes li").first).to_be_visible()
            page.screenshot(path=os.path.join(SHOTS, f"review-{who}.png"), full_page=True)
            if who == "publisher":
                expect(review.locator("button")).to_have_count(0)
                expect(review).to_contain_text("Only an admin may activate it.")
            else:
                review.locator("button.activate").click()
                expect(plugin.locator(f"tr[data-version='{VERSION}'] .active")).to_have_text("active")
                expect(plugin.locator(".pending-review")).to_have_count(0)
                page.screenshot(path=os.path.join(SHOTS, "review-activated.png"), full_page=True)
            context.close()
        browser.close()
    if errors:
        return 1
    print(f"reviewed and activated {VERSION}; screenshots in {SHOTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
