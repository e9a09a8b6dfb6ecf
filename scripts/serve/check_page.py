"""The chat page of `routelm serve` in headless Chromium (Debian's chromium and
chromedriver, over WebDriver): load it, send a message, wait for the streamed answer and for
the routing view to fill in, save a screenshot.

    python scripts/serve/check_page.py http://127.0.0.1:PORT KIND SCREENSHOT.png

KIND is `moe` (expect expert cells), `mod` (expect routed-block cells) or `dense` (expect
the page to say the model is dense). Exits non-zero on failure.
"""

import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, kind, shot = sys.argv[1], sys.argv[2], sys.argv[3]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--window-size=1400,800",
             f"--user-data-dir={tempfile.mkdtemp()}"]:
    opts.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def wait(what, cond, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    driver.save_screenshot(shot)
    raise AssertionError(f"timed out waiting for {what} (screenshot in {shot})")


try:
    driver.get(url + "/")
    wait("the model info", lambda: "layers" in driver.find_element(By.ID, "info").text)
    driver.find_element(By.ID, "input").send_keys("Tell me a story about a ship")
    driver.find_element(By.ID, "send").click()
    answer = wait("a finished answer", lambda: driver.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
    text = answer[0].text
    assert text.strip(), "the answer is empty"
    cols = driver.find_elements(By.CSS_SELECTOR, ".route-col")
    if kind == "dense":
        assert driver.find_element(By.ID, "dense").is_displayed()
        assert not cols
    else:
        cell = {"moe": ".moe-cell", "mod": ".mod-cell"}[kind]
        cells = wait(f"{kind} cells", lambda: driver.find_elements(By.CSS_SELECTOR, cell))
        assert cols, "no token columns"
        summary = {"moe": ".expert-load", "mod": ".depth-share"}[kind]
        assert driver.find_elements(By.CSS_SELECTOR, summary), f"no {summary} summary"
        print(f"page ({kind}): answer of {len(text)} characters, {len(cols)} token columns, {len(cells)} {kind} cells")
        if kind == "mod":
            hits = driver.find_elements(By.CSS_SELECTOR, ".mod-cell.hit")
            print(f"  routed blocks processed {len(hits)} of {len(cells)} token-block pairs")
    driver.save_screenshot(shot)
    print(f"screenshot: {shot}")
finally:
    driver.quit()
