"""The web chat in a real headless Chromium (Playwright's Python package driving Debian's /usr/bin/chromium): open
the address `nanoseek serve` printed (its history token in the fragment) on a server without an API key, send a
message, watch the answer stream in (reasoning in the thinking block, then the answer), reload: the conversation is
in the list and its messages come back. A server with an API key has the page ask for it. Skipped when Playwright or
/usr/bin/chromium is missing (CI: `apt-get install -y chromium`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "web-key-456"

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytest.importorskip("fastapi")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)", allow_module_level=True)

from test_serve import ServerProcess, build_model_dir  # noqa: E402  (helpers, not tests)

# Records every distinct non-empty answer text the page shows, to see it grow while streaming.
WATCH_ANSWERS = """() => {
  window.answerStates = [];
  new MutationObserver(() => {
    const a = document.querySelector('.msg.assistant .answer');
    const t = a ? a.textContent : '';
    if (t && window.answerStates[window.answerStates.length - 1] !== t) window.answerStates.push(t);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = build_model_dir(tmp_path_factory.mktemp("web-model"))
    srv = ServerProcess(d, tmp_path_factory.mktemp("web") / "server.log", "--max-model-len", "320")  # no API key
    yield srv
    srv.stop()


def chat_url(server) -> str:
    """The web chat's address as `nanoseek serve` printed it: http://127.0.0.1:PORT/#token=…"""
    return re.search(r"web chat: (\S+#token=\S+)", server.log())[1]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_chat_page_streams_and_keeps_history(server, browser):
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)  # a 401 too
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)

    page.goto(chat_url(server))
    page.wait_for_selector("body[data-ready='1']")  # the token came in the address: no dialog
    assert page.is_hidden("#key-dialog") and page.url == server.url + "/"  # and it is gone from the address bar
    assert page.inner_text("#model-name") == server_model(server)

    page.click("#settings summary")
    page.fill("#set-max-tokens", "200")  # long enough to span many frames on a loaded machine
    page.fill("#set-thinking-budget", "6")  # so this random model reaches an answer
    page.evaluate(WATCH_ANSWERS)
    page.fill("#input", "hello model")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user >> text=hello model")
    page.wait_for_function("() => document.querySelector('#send').textContent === 'Send' && "
                           "document.querySelector('.msg.assistant .answer').textContent.length > 0", timeout=60_000)
    answer = page.text_content(".msg.assistant .answer")
    reasoning = page.text_content(".msg.assistant .reasoning")
    states = page.evaluate("window.answerStates")
    assert reasoning and answer.strip()
    assert len(states) > 1 and states[-1] == answer  # it grew as it streamed

    page.reload()
    page.wait_for_selector("body[data-ready='1']")  # the token was remembered: no dialog
    assert page.is_hidden("#key-dialog")
    item = page.wait_for_selector("#conversations li .title >> text=hello model")
    item.click()
    page.wait_for_selector(".msg.assistant .answer")
    assert page.text_content(".msg.user .body") == "hello model"
    assert page.text_content(".msg.assistant .answer") == answer
    assert page.text_content(".msg.assistant .reasoning") == reasoning
    assert not problems, problems
    assert not outside, outside  # nothing loaded from anywhere but this server
    page.screenshot(path=str(server.log_path.with_name("webchat.png")))
    page.close()


def test_a_conversation_past_the_context_leaves_out_its_oldest_turns(server, browser):
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(server.model_dir)
    words = "the answer is seven and the sum is twelve".split()
    text = " ".join(words[i % len(words)] for i in range(400))
    while len(tok.encode(text)) > 110:  # one message fits the 320-token context with a 60-token answer; two do not
        text = text.rsplit(" ", 1)[0]
    page = open_chat(server, browser)
    page.fill("#set-max-tokens", "60")
    page.fill("#set-thinking-budget", "4")
    for turn in range(1, 4):
        page.fill("#input", f"{turn} {text}")
        page.press("#input", "Enter")
        page.wait_for_function(f"() => document.querySelector('#send').textContent === 'Send' && "
                               f"document.querySelectorAll('.msg.assistant').length === {turn}", timeout=60_000)
        last = page.query_selector_all(".msg.assistant")[-1]
        assert last.query_selector(".error") is None, last.inner_text()  # answered, turn after turn
        assert last.text_content().strip()
    assert "earlier messages were left out" in page.inner_text("#status")
    page.close()


def open_chat(server, browser):
    """A new page on the web chat's printed address, with Settings open."""
    page = browser.new_page()
    page.goto(chat_url(server))
    page.wait_for_selector("body[data-ready='1']")
    page.click("#settings summary")
    return page


def server_model(server) -> str:
    import httpx

    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]  # /v1 needs no key here


def test_with_an_api_key_the_page_asks_for_it(server, browser, tmp_path):
    """A server with an API key prints no token: the page asks for the key, which opens the history too."""
    keyed = ServerProcess(server.model_dir, tmp_path / "server.log", "--api-key", KEY)
    try:
        assert "#token=" not in keyed.log()
        page = browser.new_page()
        page.goto(keyed.url + "/")
        page.wait_for_selector("#key-dialog:not([hidden])")
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for_selector("body[data-ready='1']")
        assert page.inner_text("#model-name") == server_model(server)
        page.close()
    finally:
        keyed.stop()


def test_markdown_renderer_escapes_first(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    html = page.evaluate("(s) => renderMarkdown(s)",
                         "**b** *i* `a<b>` <img src=x onerror=alert(1)>\n\n- x\n- y\n\n```\n<script>\n```")
    assert html == ("<p><strong>b</strong> <em>i</em> <code>a&lt;b&gt;</code> &lt;img src=x onerror=alert(1)&gt;</p>"
                    "<ul><li>x</li><li>y</li></ul><pre><code>&lt;script&gt;</code></pre>")
    page.close()


def test_numbered_lists_keep_their_numbers(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    render = lambda s: page.evaluate("(s) => renderMarkdown(s)", s)  # noqa: E731
    assert render("1. a\n\n2. b\n\n3. c") == "<ol><li>a</li><li>b</li><li>c</li></ol>"  # was three lists of 1.
    assert render("3. a\n4. b") == '<ol start="3"><li>a</li><li>b</li></ol>'  # was 1., 2.
    assert render("The total was\n1999. Then it rose.") == "<p>The total was<br>1999. Then it rose.</p>"
    page.close()


def test_a_printed_address_opened_in_an_open_tab_takes_its_token(server, browser):
    """Opening the address a (re)started server printed in a tab already on the page changes only its fragment: the
    page takes the new token from it (and out of the address bar) and goes on."""
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#key-dialog:not([hidden])")
    page.evaluate("(hash) => { location.hash = hash; }", "#" + chat_url(server).split("#")[1])
    page.wait_for_selector("body[data-ready='1']")
    assert not page.is_visible("#key-dialog") and "token" not in page.url
    page.close()


def test_a_refused_turn_leaves_nothing_behind(server, browser):
    """A setting the server refuses: the error is shown, the question goes back to the input box, and nothing is
    stored (it was stored, and then sent to the model again with every later turn). A question whose 60th character
    is an emoji names its conversation (half an emoji in the title had the server refuse it); an answer cut off by
    Max tokens says so. (Opened without its token, the page asks for it, and says where to find it.)"""
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#key-dialog:not([hidden])")
    assert "nanoseek serve" in page.inner_text("#key-dialog") and "#token=" in page.inner_text("#key-dialog")
    token = chat_url(server).split("#token=")[1]
    page.fill("#key-input", "“" + token + "”")  # a token pasted with typographic quotes cannot go in a header
    page.click("#key-form button")
    assert "only ASCII" in page.inner_text("#key-error") and page.is_visible("#key-dialog")
    page.fill("#key-input", chat_url(server))  # the whole printed address does
    page.click("#key-form button")
    page.wait_for_selector("body[data-ready='1']")
    page.click("#settings summary")
    count = ("() => fetch('/api/conversations', {headers: {Authorization: 'Bearer " + token + "'}})"
             ".then((r) => r.json()).then((j) => j.data.length)")
    before = page.evaluate(count)
    question = "a" * 59 + "😀 what is 2 + 2?"
    page.fill("#set-max-tokens", "100000")
    page.fill("#input", question)
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('max_tokens')")
    assert page.input_value("#input") == question and not page.query_selector_all(".msg")
    assert page.evaluate(count) == before
    page.fill("#set-max-tokens", "3")
    page.fill("#set-thinking-budget", "")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant .note")
    assert page.inner_text(".msg.assistant .note") == "(cut off at Max tokens: 3)"
    page.wait_for_selector("#conversations li.active .title")
    assert page.text_content("#conversations li.active .title") == "a" * 59 + "😀"
    page.reload()  # the history says it was cut off
    page.wait_for_selector("body[data-ready='1']")
    page.click(f"#conversations li .title >> text={'a' * 59}")
    assert page.inner_text(".msg.assistant .note") == "(cut off at its token limit)"
    page.close()


def test_a_stopped_answer_says_so_after_a_reload(server, browser):
    page = open_chat(server, browser)
    page.fill("#set-max-tokens", "")  # as long as fits: hundreds of tokens
    page.fill("#set-thinking-budget", "")
    page.fill("#set-temperature", "1.5")  # a random model that does not end soon
    page.fill("#input", "stop me")
    page.press("#input", "Enter")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .reasoning')?.textContent || '') + "
                           "(document.querySelector('.msg.assistant .answer')?.textContent || '')")
    page.click("#send")  # Stop
    page.wait_for_function("() => document.querySelector('#send').textContent === 'Send'")
    assert page.text_content(".msg.assistant summary") == "Thought (stopped)"
    page.wait_for_selector("#conversations li.active .title >> text=stop me")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.click("#conversations li .title >> text=stop me")
    page.wait_for_selector(".msg.assistant summary")
    assert page.text_content(".msg.assistant summary") == "Thought (stopped)"
    page.close()


def test_system_prompt_and_renaming(server, browser):
    """The system prompt in Settings goes first in every request (and is remembered); a conversation can be renamed."""
    import json

    page = open_chat(server, browser)
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    page.on("dialog", lambda d: d.accept("Renamed ✓"))  # the rename prompt
    page.fill("#set-max-tokens", "4")
    page.fill("#set-system", "Answer in French.")
    page.dispatch_event("#set-system", "change")
    for turn in ("bonjour", "encore"):
        page.fill("#input", turn)
        page.press("#input", "Enter")
        page.wait_for_function(f"() => document.querySelector('#send').textContent === 'Send' && "
                               f"document.querySelectorAll('.msg.user').length === {1 + (turn == 'encore')}",
                               timeout=60_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert sent[-1]["messages"][0]["content"] == "Answer in French." and sent[0]["messages"][0]["role"] == "system"
    page.click("#conversations li.active .rename")
    page.wait_for_selector("#conversations li.active .title >> text=Renamed ✓")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#set-system") == "Answer in French."
    page.wait_for_selector("#conversations li .title >> text=Renamed ✓")
    page.close()
