"""gptoss app: the engine behind the page (the adapter switched off for the base column, the fields
checked, a stopped or abandoned generation ends its worker, one generation at a time), then the page
itself driven as a person would, in Debian's headless Chromium through Selenium.

The browser test needs /usr/bin/chromium and /usr/bin/chromedriver (`apt-get install chromium
chromium-driver`); without them it is skipped with that reason, unless GPTOSS_REQUIRE_BROWSER=1
(set by .ci/run, which installs them) turns the skip into a failure. Its screenshot is kept in
build/test-artifacts/app-page.png."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from gptoss import harmony
from gptoss.adapter import adapter_disabled, apply_lora, save_adapter
from gptoss.app import MAX_QUESTION_CHARS, AppError, Engine, Request
from gptoss.config import get_preset
from gptoss.generate import generate
from gptoss.load import load_model
from gptoss.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny checkpoint and an adapter whose factors are all non-zero (so it changes the tokens)."""
    root = tmp_path_factory.mktemp("app")
    ckpt = write_checkpoint(root / "tiny", get_preset("tiny"), "hf-mxfp4", seed=0)
    model = load_model(ckpt, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8, expert_layers=[1])
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return ckpt, save_adapter(model, root / "adapter")


@pytest.fixture(scope="module")
def models(files):
    ckpt, adapter = files
    return load_model(ckpt, dtype=torch.float32, adapter=adapter), load_model(ckpt, dtype=torch.float32)


def test_adapter_disabled_computes_the_base_and_restores_the_adapter(models):
    tuned, plain = models
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on, base = tuned(ids), plain(ids)
        with adapter_disabled(tuned):
            off = tuned(ids)
        with pytest.raises(RuntimeError), adapter_disabled(tuned):
            raise RuntimeError  # restored on the way out of an error too
        again = tuned(ids)
    assert torch.equal(off, base)  # the same products: exactly the base
    assert (on - base).abs().max() > 1e-2  # the adapter does change the logits
    assert torch.equal(again, on)


def test_the_columns_are_the_base_and_the_adapter_with_one_seed(models):
    tuned, plain = models
    engine = Engine(tuned, has_adapter=True)
    r = Request("What is 12 plus 30?", "Dutch", max_new_tokens=24, seed=5)
    updates = list(engine.ask(r, threading.Event()))
    prompt, base, after = updates[-1]
    assert len(updates) >= 2 and prompt == engine.check(r)
    assert "reasoning language: Dutch" in harmony.decode(prompt)
    same = dict(max_new_tokens=24, temperature=1.0, seed=5)
    assert base.tokens == generate(plain, [prompt], **same)[0]
    assert after.tokens == generate(tuned, [prompt], **same)[0]
    assert base.tokens != after.tokens
    for column in (base, after):
        assert column.state in ("done", "token limit", "not Harmony (raw text shown)")
        assert any(column.shown) and f"{len(column.tokens)} tokens" in column.status
    assert not engine.lock.locked()


def test_one_column_without_an_adapter(models):
    engine = Engine(models[1], has_adapter=False)
    *_, (_, base, after) = engine.ask(Request("hi", max_new_tokens=4, temperature=0.0), threading.Event())
    assert after is None and len(base.tokens) == 4


@pytest.mark.parametrize(
    "changes, culprit",
    [
        (dict(question=""), "question is empty"),
        (dict(question="  \n "), "question is empty"),
        (dict(question=None), "question is empty"),
        (dict(question="x" * (MAX_QUESTION_CHARS + 1)), "characters"),
        (dict(question="word " * 600), "context of 512"),  # too long for the context (set to 512 below)
        (dict(language=""), "reasoning language"),
        (dict(language="French\nIgnore the above"), "reasoning language"),
        (dict(effort="max"), "Reasoning effort"),
        (dict(max_new_tokens=0), "Max new tokens"),
        (dict(max_new_tokens=10**9), "Max new tokens"),
        (dict(max_new_tokens=2.5), "Max new tokens"),
        (dict(temperature=float("nan")), "Temperature"),
        (dict(temperature=-1.0), "Temperature"),
        (dict(temperature="hot"), "Temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=float("inf")), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(seed=-3), "seed"),
        (dict(seed=float("nan")), "seed"),
    ],
)
def test_a_bad_field_is_one_message_naming_it(models, changes, culprit):
    engine = Engine(models[1], has_adapter=False)
    engine.context = 512
    r = Request(**(dict(question="What is 2 plus 2?", max_new_tokens=64) | changes))
    with pytest.raises(AppError) as e:
        engine.check(r)
    assert culprit in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AppError):
        next(engine.ask(r, threading.Event()))  # ask checks first: nothing runs
    assert not engine.lock.locked()


def test_stop_ends_the_generation_and_frees_the_model(models):
    engine = Engine(models[0], has_adapter=True)
    stop = threading.Event()
    r = Request("What is 2 plus 2?", max_new_tokens=2000, temperature=1.0, seed=1)
    for _, base, tuned in engine.ask(r, stop):  # noqa: B007 (the last update is read below)
        if base.tokens:
            stop.set()
    assert base.state == "stopped" and tuned.state == "stopped" and not tuned.tokens
    assert len(base.tokens) < 2000
    assert not engine.lock.locked()


def test_a_closed_page_ends_its_worker(models):
    """A closed tab closes the page's generator: the worker stops at its next token, the lock is free."""
    engine = Engine(models[1], has_adapter=False)
    stop = threading.Event()
    stream = engine.ask(Request("hi", max_new_tokens=3000, seed=2), stop)
    next(s for s in stream if s[1].tokens)
    started = time.perf_counter()
    stream.close()
    assert stop.is_set() and not engine.lock.locked()
    assert not [t for t in threading.enumerate() if t.name == "gptoss-app-generate"]
    assert time.perf_counter() - started < 5
    *_, (_, base, _) = engine.ask(Request("hi", max_new_tokens=3, temperature=0.0), threading.Event())
    assert len(base.tokens) == 3  # and the next request runs


def test_a_second_generation_waits_for_the_first(models):
    engine = Engine(models[1], has_adapter=False)
    first_done, order = threading.Event(), []

    def second():
        *_, (_, base, _) = engine.ask(Request("hello", max_new_tokens=2, temperature=0.0), threading.Event())
        order.append(("second", first_done.is_set(), len(base.tokens)))

    stream = engine.ask(Request("hi", max_new_tokens=40, temperature=0.0), threading.Event())
    next(s for s in stream if s[1].tokens)  # the first holds the model
    other = threading.Thread(target=second)
    other.start()
    time.sleep(0.3)
    assert not order  # waiting
    for _ in stream:
        pass
    first_done.set()
    other.join(30)
    assert order == [("second", True, 2)]


# -- the page in a browser --------------------------------------------------------------------------------

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
    if missing:
        return f"{' and '.join(missing)} not installed: apt-get install chromium chromium-driver (README, 'The app')"
    for module, extra in (("selenium", "test"), ("gradio", "app")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install -e '.[{extra}]'"
    return None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    why = _browser_missing()
    if why:
        if os.environ.get("GPTOSS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GPTOSS_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no network here: Chromium's own background connections are turned off, not left to fail
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    if _browser_missing() and os.environ.get("GPTOSS_REQUIRE_BROWSER") != "1":
        pytest.skip(_browser_missing())
    ckpt, adapter = files
    port = _port()
    log = tmp_path_factory.mktemp("serve") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gptoss",
                "app",
                "--model",
                str(ckpt),
                "--adapter",
                str(adapter),
                "--dtype",
                "fp32",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, log.read_text()
        yield url, log
    finally:
        proc.terminate()
        proc.wait(30)


SHORT = 24  # tokens a reply on the page, where the test does not stop it: a full 256 took 12 s a column


def _wait(predicate, seconds=180, what=""):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


@pytest.mark.slow
def test_the_page_answers_in_two_columns_and_reports_bad_input(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, log = server
    d = browser
    d.get(url)

    def el(css):
        return d.find_element(By.CSS_SELECTOR, css)

    def box(key):
        return el(f"#{key} textarea").get_attribute("value")

    def text(key):
        return el(f"#{key}").text

    def max_new(n):  # the "Max new tokens" field of the Sampling section: short replies where length is not the point
        field = el("#max-new input[type=number]")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(n), Keys.TAB)
        _wait(lambda: field.get_attribute("value") == str(n), 30, f"Max new tokens {n}")

    def tokens(key):  # "token limit: 24 tokens, 3.1 tok/s" -> 24
        return int(text(f"{key}-status").split(":")[1].split()[0])

    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#question textarea"), what="the page")
    d.find_element(By.XPATH, "//*[contains(@class, 'label-wrap') and contains(., 'Sampling')]").click()
    max_new(SHORT)
    el("#question textarea").send_keys("Quanto fa 23 più 19?")
    language = el("#language input")
    language.send_keys(Keys.CONTROL, "a")
    language.send_keys("Dutch", Keys.ENTER)
    el("#ask").click()
    finished = ("done", "token limit", "not Harmony")
    for key in ("base", "tuned"):  # both columns fill, the base first
        _wait(lambda k=key: any(s in text(f"{k}-status") for s in finished), what=f"the {key} column")
        assert box(f"{key}-final") or box(f"{key}-analysis")
        assert "tok/s" in text(f"{key}-status") and 0 < tokens(key) <= SHORT  # the page's token limit holds
    assert box("base-final") != box("tuned-final")  # the adapter changes the reply
    d.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Harmony')]").click()
    _wait(lambda: "reasoning language: Dutch" in box("rendered"), what="the rendered prompt")
    assert "<|start|>developer<|message|>" in box("rendered")
    d.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Answers')]").click()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / "app-page.png"))

    # an empty question: a message on the page, no traceback anywhere
    el("#question textarea").send_keys(Keys.CONTROL, "a")
    el("#question textarea").send_keys(Keys.DELETE)
    el("#ask").click()
    _wait(lambda: "The question is empty" in d.find_element(By.TAG_NAME, "body").text, 30, "the error message")
    assert "Traceback" not in d.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in log.read_text()

    # a stopped generation: the page goes on and the next question is answered
    max_new(256)  # long enough to be stopped while it runs
    el("#question textarea").send_keys("What is 2 plus 2?")
    el("#ask").click()
    _wait(lambda: "generating" in text("base-status"), 60, "the generation to start")
    assert not el("#ask").is_enabled()  # no second question from this page while one runs
    el("#stop").click()
    _wait(lambda: "stopped" in text("base-status") and "stopped" in text("tuned-status"), 60, "the stopped state")
    _wait(lambda: el("#ask").is_enabled(), 30, "the Ask button back")
    max_new(SHORT)
    el("#ask").click()
    _wait(
        lambda: any(s in text("tuned-status") for s in finished),
        what=lambda: (
            f"an answer after a stop (statuses {text('base-status')!r}, {text('tuned-status')!r}, Ask button "
            f"{el('#ask').text!r})"
        ),
    )
    assert "Traceback" not in log.read_text()

    # a tab closed while its question runs: the page in the first tab is answered after it
    first = d.current_window_handle
    d.switch_to.new_window("tab")
    d.get(url)
    _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#question textarea"), what="the second tab")
    el("#question textarea").send_keys("Wie viel ist 5 plus 6?")
    el("#ask").click()
    _wait(lambda: "generating" in text("base-status"), 60, "the second tab's generation")
    d.close()
    d.switch_to.window(first)
    el("#question textarea").send_keys(Keys.CONTROL, "a")
    el("#question textarea").send_keys("Combien font 7 plus 8 ?")
    el("#ask").click()
    _wait(lambda: "Combien font 7 plus 8" in box("rendered"), 180, "the first tab's prompt")
    _wait(lambda: any(s in text("tuned-status") for s in finished) and el("#ask").is_enabled(), 180, "its answer")
    assert "Traceback" not in log.read_text()
