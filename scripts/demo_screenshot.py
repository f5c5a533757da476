"""Screenshot of `matryoshka demo` with the embedded model: python scripts/demo_screenshot.py [PROMPT] [OUT].

Starts the demo on port 7871, fills in the prompt in headless Chromium (Debian chromium + chromium-driver,
as tests/test_demo_browser.py), presses Generate, waits for every level and saves the page
(default docs/demo_screenshot.png).
"""
import os
import subprocess
import sys
import tempfile
import time

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

out = sys.argv[2] if len(sys.argv) > 2 else "docs/demo_screenshot.png"
profile = tempfile.mkdtemp(prefix="chromium-profile-")
env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
server = subprocess.Popen(["matryoshka", "demo", "--port", "7871"], env=env)
try:
    for _ in range(120):
        try:
            if requests.get("http://127.0.0.1:7871/", timeout=2).ok:
                break
        except Exception:
            time.sleep(1)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(driver, 120)
    driver.get("http://127.0.0.1:7871/")
    prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
    prompt.send_keys(sys.argv[1] if len(sys.argv) > 1 else "a pair of sneakers")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    def finished(driver) -> bool:
        return (driver.find_element(By.CSS_SELECTOR, "#info textarea").get_attribute("value") or "").startswith("seed ")

    wait.until(finished)
    for level in (0, 1):
        wait.until(lambda d, level=level: d.find_elements(By.CSS_SELECTOR, f"#level-{level} img") or False)
    time.sleep(1)
    driver.save_screenshot(out)
    print(driver.find_element(By.CSS_SELECTOR, "#info textarea").get_attribute("value"))
    driver.quit()
finally:
    server.terminate()
    server.wait(timeout=30)
