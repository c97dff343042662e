"""The workshop's chat page (`serve` at /, issue 21) in a real browser: headless Chromium (Debian's package) driven
by Playwright, against chapter 17's server with a tiny random model on a free 127.0.0.1 port. A streamed reply
appears with the model's name and tokens/s; Stop ends a long reply (the server frees its blocks); text the model
writes is shown as text, never run as HTML (a reply is replaced by a crafted stream for that); the thinking goes
into a folded box apart from the answer; the switches reach the request. Skipped where Chromium or Playwright is
missing, except in CI (CI is set), where it must run."""
import json
import time

import pytest
import torch

from browser import CHROMIUM, CHROMIUM_FLAGS, expect, require_browser, sync_playwright
from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.server import OpenAIServer, ServerThread, build_engine
from qwen3_scratch.tokenizer import Qwen3Tokenizer

require_browser("the chat page test")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
NAME = "workshop-tiny"


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=151_936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096)
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    engine = build_engine(model, max_batch=4, max_model_len=4096, block_size=16)
    with ServerThread(OpenAIServer(engine, Qwen3Tokenizer(), NAME).app) as running:
        yield running, engine


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    page = browser.new_page()
    page.set_default_timeout(20_000)
    outside = []  # every request must stay on the server: no CDN, nothing from elsewhere
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(served[0].url) else None)
    page.goto(served[0].url + "/")
    expect(page.locator("#model")).to_have_text(NAME)
    yield page
    page.close()
    assert not outside, f"the page fetched from elsewhere: {outside}"


def ask(page, text):
    page.fill("#input", text)
    page.click("#send")


def test_a_streamed_reply_appears_with_tokens_per_second(page):
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/completions") else None)
    page.uncheck("#thinking")
    page.fill("#temperature", "0")
    page.fill("#maxTokens", "24")
    ask(page, "To be, or not to be")
    expect(page.locator(".msg.user")).to_have_text("To be, or not to be")
    expect(page.locator("#send")).to_be_enabled()  # the stream has ended
    assert page.locator(".msg.assistant .answer").inner_text().strip(), "the reply is not empty"
    expect(page.locator("#speed")).to_contain_text("tokens/s")
    body = sent[0]
    assert body["model"] == NAME and body["stream"] is True and body["temperature"] == 0
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and "thinking_budget" not in body
    page.check("#thinking")
    page.fill("#budget", "5")
    ask(page, "And then?")
    expect(page.locator("#send")).to_be_enabled()
    assert sent[1]["thinking_budget"] == 5 and sent[1]["chat_template_kwargs"] == {"enable_thinking": True}
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"], "the chat goes on"


def test_stop_ends_a_long_reply(page, served):
    running, engine = served
    page.uncheck("#thinking")
    page.fill("#maxTokens", "4000")
    ask(page, "Tell me everything")
    answer = page.locator(".msg.assistant .answer")
    expect(answer).not_to_be_empty()
    page.click("#stop")
    expect(page.locator(".msg.assistant .note")).to_have_text("(stopped)")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    shown = answer.inner_text()
    time.sleep(0.5)
    assert answer.inner_text() == shown, "nothing arrives after Stop"
    deadline = time.monotonic() + 10
    while engine.blocks.num_used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.blocks.num_used == 0, "the server noticed the disconnect and freed the request's KV blocks"


def test_model_text_is_shown_as_text_never_run(page):
    """The page's fetch gets a crafted stream (route): markup in the reasoning and the answer must come out as
    the characters it is made of, and the thinking goes into its own folded box."""
    evil = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"><b>bold</b>"

    def chunk(delta):
        return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"
    body = (chunk({"role": "assistant"}) + chunk({"reasoning_content": "<i>hmm</i> " + evil})
            + chunk({"content": evil}) + chunk({"content": " & done"})
            + "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4,
                                                               "total_tokens": 7}}) + "\n\ndata: [DONE]\n\n")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    ask(page, "<script>alert(1)</script>")
    expect(page.locator("#send")).to_be_enabled()
    box = page.locator(".msg.assistant")
    expect(box.locator(".answer")).to_have_text(evil + " & done")
    expect(page.locator(".msg.user")).to_have_text("<script>alert(1)</script>")
    thinking = box.locator("details.thinking")
    assert not thinking.get_attribute("open"), "the thinking starts folded"
    thinking.locator("summary").click()
    expect(thinking.locator(".thought")).to_have_text("<i>hmm</i> " + evil)
    assert page.locator("#log script, #log img, #log b, #log i").count() == 0, "markup became elements"
    assert page.evaluate("window.pwned") is None, "the model's script ran"
    expect(page.locator("#speed")).to_contain_text("4 tokens")
