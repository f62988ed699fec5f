"""Screenshots of the run report: headless Chromium through Playwright (pip install playwright;
Debian chromium at /usr/bin/chromium). Usage: python docs/screenshots.py /abs/path/report.html docs/
"""
import sys
from playwright.sync_api import sync_playwright
html, outdir = sys.argv[1], sys.argv[2]
sections = {"1. Input": ["input.png"], "2. Packing": ["packing.png", "packing.html"], "3. Embedding": ["embedding.png", "embedding.html"],
            "4. Equivalence": ["equivalence.png", "spot_check_worst.html"], "5. Embeddings": ["projection.png"], "6. Provenance": ["provenance.html"]}
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = b.new_page(viewport={"width": 1500, "height": 950})
    for i, (sec, files) in enumerate(sections.items(), 1):
        for j, f in enumerate(files):
            page.goto(f"file://{html}")
            page.wait_for_timeout(1200)
            page.get_by_text(sec, exact=True).click()
            page.wait_for_timeout(500)
            row = page.get_by_text(f"results/report/{f}", exact=True).locator("xpath=..")
            row.locator("svg").first.click()
            page.wait_for_timeout(1500)
            page.screenshot(path=f"{outdir}/section{i}-{j}.png")
            print(sec, f, "ok", flush=True)
    b.close()
