"""The chat page of `tinylm serve` (tinylm/serve/static), driven in headless Chromium
through Selenium: Debian's ``chromium`` and ``chromium-driver`` packages (CI:
``apt-get install chromium chromium-driver``; selenium comes with the ``bench`` extra).
Skipped, with the reason, when either is missing.

A tiny GPT-2 saved to a temporary folder (with a chatml template), loaded as
``--model`` loads it, is served on a free localhost port with an API key. The page
reports the missing key, takes it, shows the model name, streams two greedy turns
into the DOM, each equal to what the official ``openai`` client gets for the same
request (the whole conversation as ``messages``: the page keeps it), and shows a bad
request's error. A second server, over a model slowed down per forward, checks Stop:
the answer ends where it was, a prefix of the full one, and the server frees the
sequence's slot. The screenshot goes to pytest's tmp folder, not the repository.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the bench extra)")
openai = pytest.importorskip("openai", reason="the page's answers are checked with openai")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import tinylm  # noqa: E402
from tinylm.loading import load_model  # noqa: E402
from tinylm.models import Decoder, GPT2Config  # noqa: E402
from tinylm.prompts import ChatTemplate  # noqa: E402
from tinylm.serve import Server, ServerConfig  # noqa: E402
from tinylm.tokenizers.bpe import BPETokenizer  # noqa: E402

TEXT = (pathlib.Path(__file__).parent / "data" / "tinyshakespeare_head.txt").read_text()[:20000]
KEY = "page-test-key"
NAME = "tiny-chat"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, DRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(f"needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                    f"missing): apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=900,700"):
        options.add_argument(arg)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    try:
        driver = webdriver.Chrome(service=Service(DRIVER, log_output=str(log)), options=options)
    except WebDriverException as e:
        pytest.skip(f"headless chromium does not start: {e.msg}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with an untied head (a tied one at random init repeats
    the last token: the same answer to every message), a 300-token BPE and chatml,
    saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("page-model")
    tok = BPETokenizer.train([TEXT], 300, special_tokens=["<|endoftext|>"])
    tinylm.seed(0)
    Decoder(GPT2Config(vocab_size=len(tok), d_model=32, n_layer=2, n_head=4, max_positions=512,
                       tie_embeddings=False)).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    ChatTemplate.builtin("chatml").save(path)
    return path


@contextlib.contextmanager
def serving(model, tok, model_dir, **config):
    """The server `tinylm serve --model model_dir` builds, started on a free port."""
    server = Server(model, tok, ServerConfig(port=0, model_name=NAME, **config),
                    template=ChatTemplate.resolve(None, model_dir)).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(model_dir):
    model, tok = load_model(model_dir)
    with serving(model, tok, model_dir, api_key=KEY) as s:
        yield s


# --------------------------------------------------------------------------- the page


def wait(driver, condition, what: str, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(
        lambda _: condition(), message=f"timed out waiting for {what}")


def text(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).get_property("textContent")


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#log li.assistant")


def answer_text(li) -> str:
    return li.find_element(By.CSS_SELECTOR, ".content").get_property("textContent")


def set_field(driver, id_: str, value) -> None:
    field = driver.find_element(By.ID, id_)
    field.clear()
    field.send_keys(str(value))


def open_page(driver, server) -> None:
    driver.get(server.url + "/")
    wait(driver, lambda: text(driver, "#model") != "connecting…", "the model name")
    driver.find_element(By.CSS_SELECTOR, "#settings summary").click()


def watch(driver) -> None:
    """From now on, window.pieces counts the text nodes added to answers (one per
    streamed delta the page appended) and window.sent holds the JSON bodies the page
    posted."""
    driver.execute_script("""
        window.sent = [];
        const fetch = window.fetch;
        window.fetch = (url, init) => {
          if (init && init.body) window.sent.push(JSON.parse(init.body));
          return fetch(url, init);
        };
        window.pieces = 0;
        new MutationObserver((records) => {
          for (const r of records) for (const n of r.addedNodes)
            if (n.nodeType === Node.TEXT_NODE && r.target.classList.contains("content")) window.pieces++;
        }).observe(document.getElementById("log"), {childList: true, subtree: true});""")


def say(driver, message: str, n_answers: int) -> str:
    """Type ``message``, send it, wait for answer number ``n_answers`` to finish."""
    driver.find_element(By.ID, "prompt").send_keys(message)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda: len(answers(driver)) == n_answers
         and answers(driver)[-1].get_attribute("data-state") == "done", "the answer")
    return answer_text(answers(driver)[-1])


def api_answer(server, messages, max_tokens: int):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0,
                                          max_tokens=max_tokens)


# --------------------------------------------------------------------------- tests


def test_the_page_streams_answers_and_keeps_the_conversation(server, browser, tmp_path):
    d = browser
    open_page(d, server)
    # without the key: the 401 in words, and where to put the key
    assert text(d, "#model") == "no model"
    error = d.find_element(By.ID, "error")
    assert error.is_displayed() and "401" in error.text and "API key" in error.text
    d.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)
    wait(d, lambda: text(d, "#model") == NAME, "the model name")
    assert not error.is_displayed()
    set_field(d, "temperature", 0)
    set_field(d, "max-tokens", 12)

    watch(d)
    first = say(d, "Good morrow, my lord", 1)
    expect = api_answer(server, [{"role": "user", "content": "Good morrow, my lord"}], 12)
    assert first.strip() and first == expect.choices[0].message.content
    assert expect.usage.completion_tokens >= 3
    assert d.execute_script("return window.pieces") >= 2  # streamed, not all at once

    second = say(d, "What news?", 2)
    history = [{"role": "user", "content": "Good morrow, my lord"},
               {"role": "assistant", "content": first},
               {"role": "user", "content": "What news?"}]
    assert second.strip() and second == api_answer(server, history, 12).choices[0].message.content
    sent = d.execute_script("return window.sent")
    assert [b["messages"] for b in sent] == [history[:1], history]
    assert all(b["model"] == NAME and b["stream"] is True and b["temperature"] == 0
               and b["max_tokens"] == 12 for b in sent)
    roles = [li.get_attribute("data-role") for li in d.find_elements(By.CSS_SELECTOR, "#log li")]
    assert roles == ["user", "assistant", "user", "assistant"]
    d.save_screenshot(str(tmp_path / "chat.png"))

    # a request the server refuses: its error in words; the turn is taken back
    set_field(d, "max-tokens", 100000)
    d.find_element(By.ID, "prompt").send_keys("Too long")
    d.find_element(By.ID, "send").click()
    wait(d, lambda: error.is_displayed() and d.find_element(By.ID, "send").is_enabled(),
         "the error")
    assert "400" in error.text and "max_tokens" in error.text, error.text
    assert len(d.find_elements(By.CSS_SELECTOR, "#log li")) == 4
    assert d.find_element(By.ID, "prompt").get_property("value") == "Too long"


class Slow(Decoder):
    """A Decoder that sleeps before each forward: a stream long enough to stop."""

    def forward(self, *args, **kwargs):
        time.sleep(0.03)
        return super().forward(*args, **kwargs)


def test_stop_keeps_the_partial_answer_and_frees_the_slot(server, model_dir, browser):
    model, tok = load_model(model_dir)
    slow = Slow(model.config)
    slow.load_state_dict(model.state_dict())
    messages = [{"role": "user", "content": "Speak"}]
    full = api_answer(server, messages, 60).choices[0].message.content
    with serving(slow.eval(), tok, model_dir) as s:
        d = browser
        open_page(d, s)
        assert text(d, "#model") == NAME
        set_field(d, "temperature", 0)
        set_field(d, "max-tokens", 60)
        d.find_element(By.ID, "prompt").send_keys("Speak", Keys.ENTER)
        wait(d, lambda: answers(d) and answer_text(answers(d)[-1]), "the first piece")
        d.find_element(By.ID, "stop").click()
        wait(d, lambda: answers(d)[-1].get_attribute("data-state") != "streaming", "the stop")
        li = answers(d)[-1]
        assert li.get_attribute("data-state") == "stopped"
        partial = answer_text(li)
        assert partial and full.startswith(partial) and len(partial) < len(full)
        assert d.find_element(By.ID, "send").is_enabled()
        assert not d.find_element(By.ID, "stop").is_enabled()
        wait(d, lambda: s.engine.metrics().get("cancelled") == 1
             and s.engine.metrics()["active_rows"] == 0, "the server to free the slot")
