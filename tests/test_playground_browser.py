"""The playground page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against a real miras-serve serving the shipped moneta-tiny behind an API key: the key typed into the page,
streamed text, chat mode, the surprise heat map, and Stop freeing the server's slot.

`make test` installs the browser and sets MIRAS_REQUIRE_BROWSER=1, so there a missing browser fails instead of
skipping. MIRAS_PLAYGROUND_SCREENSHOT=docs/playground.png refreshes the screenshot in the docs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from test_server_support import ServerProcess, metric, metric_values

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,860"]
API_KEY = "playground-test-key"
MODEL = "moneta-tiny"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("MIRAS_REQUIRE_BROWSER"):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} missing: `make test` installs chromium and chromium-driver",
                    pytrace=False)
    pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)", allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(Path(MODEL), "--max-num-seqs", "2", "--api-key", API_KEY)
    try:
        yield process.url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server + "/")
        assert driver.title == "Miras Serve playground"
        wait(driver, lambda d: d.find_element(By.ID, "model-name").text == "(API key needed)")
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        wait(driver, lambda d: d.find_element(By.ID, "model-name").text == MODEL)
        yield driver
    finally:
        driver.quit()


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def set_checkbox(driver, element_id: str, on: bool) -> None:
    box = driver.find_element(By.ID, element_id)
    if box.is_selected() != on:
        box.click()


def generate(driver, prompt: str, max_tokens: int) -> None:
    set_field(driver, "max-tokens", str(max_tokens))
    set_field(driver, "prompt", prompt)
    driver.find_element(By.ID, "send").click()


def reply(driver) -> str:
    return driver.execute_script("return document.querySelector('#output .reply').textContent")


def server_metric(server: str, name: str, **labels: str) -> float:
    return metric(metric_values(server), f"miras:{name}", **labels)


def test_completion_streams_text_and_shows_stats(page):
    set_checkbox(page, "surprise", False)
    generate(page, "ROMEO.\n", 24)
    wait(page, lambda d: text_of(d, "status").startswith("finished"))
    assert text_of(page, "error") == ""
    assert reply(page).strip(), "no text streamed"
    assert text_of(page, "ntokens") == "24" or text_of(page, "status") == "finished: stop"
    assert text_of(page, "ttft").endswith(" ms")
    assert float(text_of(page, "tps")) > 0
    wait(page, lambda d: text_of(d, "slots-total") == "2" and text_of(d, "state-size").endswith("MiB"))


def test_chat_mode_keeps_the_conversation(page):
    page.find_element(By.CSS_SELECTOR, "input[name=mode][value=chat]").click()
    try:
        generate(page, "Who art thou?", 12)
        wait(page, lambda d: text_of(d, "status").startswith("finished"))
        assert text_of(page, "error") == ""
        roles = [e.text.lower() for e in page.find_elements(By.CSS_SELECTOR, "#transcript .role")]
        assert roles == ["user", "assistant"]
        assert "Who art thou?" in text_of(page, "transcript")
        set_checkbox(page, "surprise", True)  # chat's logprobs split the reply into tokens another way
        generate(page, "Speak again.", 12)
        wait(page, lambda d: text_of(d, "status").startswith("finished"))
        assert text_of(page, "error") == ""
        assert len(page.find_elements(By.CSS_SELECTOR, "#transcript .role")) == 4
        wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#output .reply .tok.heat")) > 0, timeout=10)
        assert len(page.find_elements(By.CSS_SELECTOR, "#output .prompt-tokens .tok.heat")) > 10  # the whole chat
    finally:
        set_checkbox(page, "surprise", False)
        page.find_element(By.CSS_SELECTOR, "input[name=mode][value=completion]").click()


def test_surprise_view_colours_tokens(page):
    set_checkbox(page, "surprise", True)
    generate(page, "ROMEO.\nWhat light through yonder window breaks?\n", 40)
    wait(page, lambda d: text_of(d, "status").startswith("finished"))
    assert text_of(page, "error") == ""
    heat = "#output .reply .tok.heat"
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, heat)) > 0, timeout=10)
    prompt_heat = page.find_elements(By.CSS_SELECTOR, "#output .prompt-tokens .tok.heat")
    assert len(prompt_heat) > 5
    colours = {e.value_of_css_property("background-color") for e in page.find_elements(By.CSS_SELECTOR, heat)}
    assert len(colours) > 3, "a heat map of one colour"
    assert page.find_element(By.ID, "legend").is_displayed()
    layers = Select(page.find_element(By.ID, "surprise-layer"))
    names = [o.text for o in layers.options]
    assert names[0] == "mean of layers" and len(names) > 1 and all(re.fullmatch(r"layer \d+", n) for n in names[1:])
    layers.select_by_index(1)
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, heat)) > 0, timeout=10)
    save_screenshot(page)
    set_checkbox(page, "surprise", False)
    wait(page, lambda d: not d.find_elements(By.CSS_SELECTOR, ".tok.heat"), timeout=10)


def save_screenshot(page) -> None:
    target = os.environ.get("MIRAS_PLAYGROUND_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        assert page.save_screenshot(target)


def test_stop_mid_stream_frees_the_slot(page, server):
    set_checkbox(page, "ignore-eos", True)
    try:
        generate(page, "ROMEO.\n", 20000)
        wait(page, lambda d: len(reply(d)) > 20)
        assert text_of(page, "status") == "generating…"
        assert server_metric(server, "state_slots_used") == 1
        page.find_element(By.ID, "stop").click()
        wait(page, lambda d: text_of(d, "status") == "stopped", timeout=10)
        deadline = time.monotonic() + 15
        while server_metric(server, "state_slots_used") != 0:
            assert time.monotonic() < deadline, "the slot was not freed after Stop"
            time.sleep(0.1)
        assert server_metric(server, "num_requests_running") == 0
        assert server_metric(server, "request_success_total", finished_reason="abort") == 1
        wait(page, lambda d: text_of(d, "slots-used") == "0", timeout=10)
    finally:
        set_checkbox(page, "ignore-eos", False)
