"""The playground page at / in a real browser: Debian's headless Chromium, driven by Selenium.

The page's streamed text is compared with what the server returns for the same settings without
streaming, so the page neither drops, repeats nor reorders pieces.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request

import pytest
from serve_helpers import API_KEY, get_json

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

INSTALL_HINT = (
    "install with: apt-get install chromium chromium-driver (.ci/run does this); selenium is in the test extra"
)

# Records (milliseconds, length of #output's text) at every change, so the test sees each streamed step
# however fast the model is, instead of hoping that polling from here lands between two of them.
RECORD_GROWTH = """
window.outputGrowth = [];
new MutationObserver(() => window.outputGrowth.push(
    [performance.now(), document.getElementById("output").textContent.length]))
  .observe(document.getElementById("output"), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    missing = [
        name
        for name, found in (("chromium", chromium), ("chromedriver", chromedriver), ("selenium", webdriver))
        if found is None
    ]
    if missing:
        pytest.skip(f"the browser test needs {' and '.join(missing)}; {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def post_completion(server_url: str, body: dict, api_key: str | None = None) -> tuple[int, dict]:
    """POST /v1/completions without streaming; (HTTP status, JSON body), errors included."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    request = urllib.request.Request(server_url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def served_model(server_url: str) -> dict:
    status, models = get_json(server_url + "/v1/models")
    assert status == 200, models
    return models["data"][0]


def human_count(n: int) -> str:
    """Three significant digits and a suffix, as the page writes a parameter count (28953600 -> 29M)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def open_page(driver, server_url: str, model: dict) -> None:
    driver.get(server_url + "/")
    WebDriverWait(driver, 10).until(lambda d: model["id"] in d.find_element(By.ID, "model-info").text)


def fill(driver, **values: str) -> None:
    """Type into the page's boxes by element id (top_p -> #top-p)."""
    for name, value in values.items():
        box = driver.find_element(By.ID, name.replace("_", "-"))
        box.clear()
        box.send_keys(value)


def output_text(driver) -> str:
    # textContent, not .text: Selenium's rendered text trims and folds whitespace the model produced.
    return driver.execute_script("return document.getElementById('output').textContent")


def wait_until_idle(driver, timeout: float = 30) -> None:
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "generate").is_enabled())


def test_page_streams_the_completion_the_server_returns(browser, server_url):
    model = served_model(server_url)
    open_page(browser, server_url, model)
    assert browser.find_element(By.ID, "model-info").text == (
        f"{model['id']} · {human_count(model['parameters'])} parameters · context {model['max_model_len']}"
    )

    prompt = "The quick brown fox"
    fill(browser, prompt=prompt, max_tokens="40", temperature="0")
    browser.execute_script(RECORD_GROWTH)
    browser.find_element(By.ID, "generate").click()
    wait_until_idle(browser)

    status, expected = post_completion(
        server_url, {"model": model["id"], "prompt": prompt, "max_tokens": 40, "temperature": 0, "top_p": 1}
    )
    assert status == 200, expected
    assert browser.find_element(By.ID, "error").text == ""
    assert output_text(browser) == expected["choices"][0]["text"]
    lengths = [length for _, length in browser.execute_script("return window.outputGrowth")]
    assert len(set(lengths)) >= 3, f"#output grew in fewer than two steps: {lengths}"
    assert lengths == sorted(lengths)
    speed = browser.find_element(By.ID, "speed").text
    assert speed.startswith(f"{expected['usage']['completion_tokens']} tokens · ")
    tokens_per_second = float(speed.split(" · ")[1].removesuffix(" tokens/s"))
    assert tokens_per_second > 0


def test_stop_button_ends_a_long_generation(browser, server_url):
    model = served_model(server_url)
    open_page(browser, server_url, model)
    prompt = "Once upon a time"
    # The most the context allows: a byte-level tokenizer makes at most one token per byte of the prompt.
    max_tokens = model["max_model_len"] - len(prompt.encode())
    fill(browser, prompt=prompt, max_tokens=str(max_tokens), temperature="0")
    browser.find_element(By.ID, "generate").click()
    # Text shows while the request is still running: it is streamed, not delivered at the end.
    WebDriverWait(browser, 10, poll_frequency=0.02).until(
        lambda d: output_text(d) and d.find_element(By.ID, "stop").is_enabled()
    )
    browser.find_element(By.ID, "stop").click()
    wait_until_idle(browser, timeout=5)
    stopped_at = output_text(browser)
    time.sleep(0.5)
    assert output_text(browser) == stopped_at
    assert browser.find_element(By.ID, "status").text == "Stopped"
    assert browser.find_element(By.ID, "error").text == ""
    shown_tokens = int(browser.find_element(By.ID, "speed").text.split(" tokens")[0])
    assert 0 < shown_tokens < max_tokens


def test_page_shows_the_servers_error_message(browser, server_url):
    model = served_model(server_url)
    open_page(browser, server_url, model)
    fill(browser, prompt="Hello", max_tokens="5", temperature="0.7", top_p="1.5")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "error").text)

    status, body = post_completion(
        server_url, {"model": model["id"], "prompt": "Hello", "max_tokens": 5, "temperature": 0.7, "top_p": 1.5}
    )
    assert status == 400
    assert browser.find_element(By.ID, "error").text == body["error"]["message"]
    assert output_text(browser) == ""


def test_page_asks_for_the_api_key_the_server_requires(browser, keyed_server):
    url = keyed_server.url
    status, refusal = get_json(url + "/v1/models")
    assert status == 401
    browser.get(url + "/")
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == refusal["error"]["message"]
    key_box = browser.find_element(By.ID, "api-key")
    assert key_box.is_displayed()

    key_box.send_keys(API_KEY + Keys.TAB)
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "model-info").text.startswith("tiny-base · "))
    assert browser.find_element(By.ID, "error").text == ""
    fill(browser, prompt="Hello", max_tokens="5", temperature="0")
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_until_idle(browser)
    status, expected = post_completion(
        url, {"model": "tiny-base", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "top_p": 1}, api_key=API_KEY
    )
    assert status == 200, expected
    assert output_text(browser) == expected["choices"][0]["text"] != ""
    assert browser.execute_script("return sessionStorage.getItem('gptlab-api-key')") == API_KEY
