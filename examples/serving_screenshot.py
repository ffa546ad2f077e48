"""Use the server's page in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, through
Selenium): pick a pair, type a text, press Translate, read the translation, save a screenshot.

    python examples/serving_screenshot.py --url http://127.0.0.1:8080 --lang-pair en-de \\
        --text "Click the button to open the dialog." --out docs/serving/page.png

(start the server first: ``python -m taskmoe_fairseq.serve --checkpoint ...``). The test
``tests/test_serve.py`` drives the page with :func:`translate_in_browser`.
"""

import argparse
import os
import shutil
import sys
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# flags that work in the project's containers (no sandbox, no GPU, no network besides the page)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=900,720"]


TYPED_CHARACTERS = 200  # longer texts are pasted into the page (set through the DOM), shorter ones typed


def translate_in_browser(url: str, lang_pair: str, text: str, screenshot=None, timeout: float = 120.0):
    """``(translation shown, error shown)`` after translating ``text`` on the page at ``url``.

    Raises:
        RuntimeError: Chromium or chromedriver missing (install Debian's chromium chromium-driver).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="taskmoe-chromium-")
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(timeout)
        driver.get(url + "/")
        wait = WebDriverWait(driver, timeout)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#pair option[value='{lang_pair}']"))
        Select(driver.find_element(By.ID, "pair")).select_by_value(lang_pair)
        source = driver.find_element(By.ID, "source")
        source.clear()
        if len(text) > TYPED_CHARACTERS:  # pasted: WebDriver types a key at a time (12 s for 5,500 characters)
            driver.execute_script(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
                source, text)
        else:
            source.send_keys(text)
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-done") == "1")
        shown = driver.find_element(By.ID, "output").text
        error = driver.find_element(By.ID, "error").text
        if screenshot:
            os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
            driver.save_screenshot(screenshot)
        return shown, error
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--lang-pair", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True, help="PNG screenshot")
    options = parser.parse_args(argv)
    shown, error = translate_in_browser(options.url, options.lang_pair, options.text, options.out)
    print(f"translation: {shown!r}  error: {error!r}  screenshot: {options.out}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
