"""Walks the dashboard's shadow panel in headless Chromium.

usage: shadow.py BASE_URL SCREENSHOT_DIR PLUGIN SHADOW_VERSION

PLUGIN has SHADOW_VERSION as its shadow, with one run where the two disagreed. The plugin page
shows the panel with that disagreement first, linked to both runs, then the outcomes side by
side; the shadow run's page links back to the run that decided. "Stop shadowing" ends the
shadow; the version's "Shadow" button starts it again; "Promote" makes it active. A screenshot
of the panel goes to SCREENSHOT_DIR (shadow-panel.png). Any console error or uncaught exception
fails the walk.
"""

import os
import sys

from playwright.sync_api import expect, sync_playwright

BASE, SHOTS, PLUGIN, VERSION = sys.argv[1:5]
TIMEOUT = 30_000


def main() -> int:
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=os.environ.get("STEPWISE_CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        expect.set_options(timeout=TIMEOUT)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda message: errors.append(f"console: {message.text}") if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
        page.goto(f"{BASE}/plugins")
        plugin = page.locator(f"section[data-plugin={PLUGIN}]")
        panel = plugin.locator(".shadow-panel.current")
        expect(panel).to_have_count(1)
        expect(panel.locator("h3 .mono")).to_have_attribute("title", VERSION)
        # Disagreements come first, each linked to both runs.
        expect(panel.locator("h4").first).to_have_text("Disagreements")
        rows = panel.locator("table.disagreements tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first.locator(".status").nth(0)).to_have_text("passed")
        expect(rows.first.locator(".status").nth(1)).to_have_text("failed")
        expect(panel.locator("table.shadow-counts tr[data-side=shadow] td").nth(1)).to_have_text("1")
        page.screenshot(path=os.path.join(SHOTS, "shadow-panel.png"), full_page=True)
        # The shadow run says what it is and links to its primary.
        primary = rows.first.locator("a").nth(0).text_content()
        rows.first.locator("a").nth(1).click()
        note = page.locator(".shadow-note")
        expect(note).to_be_visible()
        expect(note.locator("a")).to_have_text(primary)
        page.go_back()
        # Stop, start again from the versions list, then promote from the panel.
        plugin.locator("button.stop-shadow").click()
        expect(plugin.locator(".shadow-panel.ended[data-state=stopped]")).to_have_count(1)
        plugin.locator(f"tr[data-version='{VERSION}'] button.shadow").click()
        expect(plugin.locator(".shadow-panel.current")).to_have_count(1)
        expect(plugin.locator(f"tr[data-version='{VERSION}'] .status")).to_have_text("shadow")
        plugin.locator(".shadow-panel.current button.activate").click()
        expect(plugin.locator(f"tr[data-version='{VERSION}'] .active")).to_have_text("active")
        expect(plugin.locator(".shadow-panel.ended[data-state=promoted]")).to_have_count(1)
        browser.close()
    if errors:
        print("\n".join(errors))
        return 1
    print(f"walked the shadow panel of {PLUGIN} and promoted {VERSION}; screenshot in {SHOTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
