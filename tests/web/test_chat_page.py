"""The chat page in a real headless chromium, against real servers running SmolLM2-135M on the CPU.

What is real here: every answer comes from the real model through the page's own streaming client.
Where a test needs the model to say something exact (raw HTML, a tool call), it asks the server to
force it with constrained decoding (`response_format` / `tool_choice`, set in the page's "Extra
request JSON" field): the model really generates it, token by token, and the page renders the stream.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, screenshot
from server_proc import ServerProcess, metric, wait_engine_idle

PROMPT = "Name three colours."
EVIL = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


# ---- helpers: what a person does -----------------------------------------------------------------

def set_extra_json(page: Any, extra: dict[str, Any] | None) -> None:
    page.click("#toggle-settings")
    page.fill("#extra-json", json.dumps(extra) if extra else "")
    page.click("#close-settings")


def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_answer_done(page: Any, timeout_ms: int = 240_000) -> Any:
    """The last assistant message, once its stream has ended (stats or error shown)."""
    page.wait_for_selector("body[data-state='idle'] article.assistant:last-of-type .msg-meta:not(:empty), "
                           "body[data-state='idle'] article.assistant:last-of-type .error-card", timeout=timeout_ms)
    return page.locator("article.assistant").last


def stored(page: Any) -> dict[str, Any]:
    """The open conversation as the page saved it in localStorage."""
    return page.evaluate("""() => {
        const id = JSON.parse(localStorage.getItem('dashchat.settings')).lastConversation;
        return JSON.parse(localStorage.getItem('dashchat.conversation.' + id));
    }""")


def watch_stream(page: Any) -> None:
    """Record (page state, answer length) at every change of the message list."""
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const last = document.querySelector('#messages article.assistant:last-of-type .content');
            if (last) window.__seen.push([document.body.dataset.state, last.textContent.length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")


def hold_request(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a chat request with the test key and leave its answer unread until the socket is closed."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def labelled_metric(base_url: str, name: str, labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[1])
    return 0.0


# ---- tests ---------------------------------------------------------------------------------------

def test_streamed_answer_appears_and_matches_the_api(page_factory: Any, web_server: ServerProcess,
                                                     model_name: str) -> None:
    page = page_factory(web_server.base_url)
    assert page.locator("#model-select").input_value() == model_name
    # greedy and a fixed length, so the same request through the API must give the same text
    set_extra_json(page, {"temperature": 0, "max_tokens": 40, "ignore_eos": True})
    screenshot(page, "01-empty")
    watch_stream(page)
    send(page, PROMPT)
    answer = wait_answer_done(page)
    screenshot(page, "02-answer")

    seen = page.evaluate("window.__seen")
    final = len(answer.locator(".content").inner_text())
    partial = [n for state, n in seen if state == "generating" and 0 < n]
    assert partial, f"no text was shown while the answer was streaming: {seen[:20]}"
    assert min(partial) < final, "the answer did not grow as it streamed"

    meta = answer.locator(".msg-meta").inner_text()
    assert re.search(r"TTFT \d+\.\d\d s", meta) and re.search(r"[\d.]+ tok/s", meta), meta
    assert "40 tokens" in meta and "hit max tokens" in meta, meta  # counted by the server (usage)

    conv = stored(page)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    r = httpx.post(f"{web_server.base_url}/v1/chat/completions", timeout=120, json={
        "model": model_name, "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0, "max_tokens": 40, "ignore_eos": True})
    assert conv["messages"][1]["content"] == r.json()["choices"][0]["message"]["content"]
    assert conv["messages"][1]["content"].strip() != ""


def test_stop_aborts_the_generation_on_the_server(page_factory: Any, web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url)
    set_extra_json(page, {"ignore_eos": True, "max_tokens": 900})  # long: minutes of tokens on a CPU
    aborted_before = labelled_metric(web_server.base_url, "dashchat_requests_aborted_total", 'reason="disconnect"')
    send(page, "Write a very long story about a lighthouse.")
    page.wait_for_function("""() => {
        const c = document.querySelector('#messages article.assistant:last-of-type .content');
        return c && c.textContent.length > 0;
    }""")
    assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
    page.click("#stop")
    answer = wait_answer_done(page, timeout_ms=30_000)
    assert "stopped" in answer.locator(".msg-meta").inner_text()
    assert page.locator("#send").is_visible()

    # the server saw the connection close and freed everything
    assert wait_engine_idle(web_server.base_url, timeout=30) == (0, 0)
    deadline = time.monotonic() + 30
    while labelled_metric(web_server.base_url, "dashchat_requests_aborted_total",
                          'reason="disconnect"') <= aborted_before:
        assert time.monotonic() < deadline, "the server never counted the aborted request"
        time.sleep(0.1)
    kept = stored(page)["messages"][1]
    assert kept["meta"]["finish"] == "stopped" and kept["content"]  # the partial answer stays
    assert kept["meta"]["tokens"] < 900


def test_leaving_a_conversation_mid_answer_keeps_what_was_streamed(page_factory: Any,
                                                                   web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url)
    set_extra_json(page, {"ignore_eos": True, "max_tokens": 900})
    send(page, "Tell me about the sea.")
    page.wait_for_function("""() => {
        const c = document.querySelector('#messages article.assistant:last-of-type .content');
        return c && c.textContent.length > 0;
    }""")
    page.click("#new-chat")  # stops the answer: the page shows one conversation at a time
    page.wait_for_selector("body[data-state='idle']")
    assert page.locator("article").count() == 0
    assert wait_engine_idle(web_server.base_url, timeout=30) == (0, 0)
    page.click(".conversation-open")
    answer = page.locator("article.assistant")
    assert "stopped" in answer.locator(".msg-meta").inner_text()
    kept = stored(page)["messages"][1]
    assert kept["content"] and kept["meta"]["finish"] == "stopped"


def test_model_output_with_html_is_shown_as_text(page_factory: Any, web_server: ServerProcess) -> None:
    """Real model output containing raw HTML: constrained decoding makes SmolLM2 generate EVIL itself."""
    page = page_factory(web_server.base_url)
    schema = {"type": "object", "properties": {"html": {"const": EVIL}}, "required": ["html"],
              "additionalProperties": False}
    set_extra_json(page, {"max_tokens": 120, "temperature": 0,
                          "response_format": {"type": "json_schema", "json_schema": {"name": "page", "schema": schema}}})
    send(page, "Say something.")
    answer = wait_answer_done(page)
    screenshot(page, "03-html-as-text")
    content = stored(page)["messages"][1]["content"]
    assert json.loads(content) == {"html": EVIL}, content  # the model really said it
    shown = answer.locator(".content")
    assert EVIL in shown.inner_text()  # as text, character for character
    assert page.locator("#messages img, #messages script, #messages [onerror]").count() == 0
    assert page.evaluate("window.__pwned") is None


@pytest.mark.parametrize("text", [
    EVIL,
    "<svg onload=window.__pwned=3></svg>",
    "[link](javascript:window.__pwned=4) and <a href='javascript:window.__pwned=5'>a</a>",
    "![x](http://example.invalid/track.png)",
    "```html\n" + EVIL + "\n```",
    "<iframe srcdoc='<script>parent.__pwned=6</script>'></iframe><style>body{display:none}</style>",
    "**bold** <b onmouseover=window.__pwned=7>b</b>",
])
def test_renderer_keeps_hostile_markdown_inert(page_factory: Any, web_server: ServerProcess, text: str) -> None:
    """The function every answer goes through (also while streaming), on hostile inputs a model could write."""
    page = page_factory(web_server.base_url)
    result = page.evaluate("""(text) => {
        const box = document.createElement('div');
        document.body.append(box);
        window.dashchat.renderMarkdown(box, text);
        const bad = box.querySelectorAll('img, script, iframe, style, svg, [onerror], [onload], [onmouseover], [srcdoc]');
        const hrefs = [...box.querySelectorAll('a')].map(a => a.getAttribute('href'));
        return {bad: bad.length, hrefs, text: box.textContent};
    }""", text)
    assert result["bad"] == 0, result
    assert all(h is None or h.startswith(("http:", "https:", "mailto:", "#")) for h in result["hrefs"]), result
    assert page.evaluate("window.__pwned") is None
    if text == EVIL or text.startswith("```"):
        assert EVIL in result["text"]  # shown, not dropped


def test_reload_keeps_the_conversation_and_the_list_manages_it(page_factory: Any, web_server: ServerProcess,
                                                               tmp_path: Path) -> None:
    page = page_factory(web_server.base_url)
    set_extra_json(page, {"max_tokens": 12})
    send(page, "Hello there")
    wait_answer_done(page)
    answer_text = stored(page)["messages"][1]["content"]
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("article.user .content").inner_text() == "Hello there"
    assert page.locator("article.assistant").count() == 1
    assert stored(page)["messages"][1]["content"] == answer_text
    assert page.locator(".conversation.active .conversation-open").inner_text() == "Hello there"

    # rename
    page.click(".conversation.active .rename")
    page.fill(".rename-input", "Greetings")
    page.press(".rename-input", "Enter")
    assert page.locator(".conversation.active .conversation-open").inner_text() == "Greetings"
    assert page.locator("#chat-title").inner_text() == "Greetings"

    # export, delete (two clicks), import the export back
    with page.expect_download() as download:
        page.click("#export-all")
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert data["format"] == "dashchat.conversations" and data["conversations"][0]["title"] == "Greetings"
    page.click(".conversation.active .delete")
    page.click(".conversation.active .delete.armed")
    assert page.locator(".conversation").count() == 0
    assert page.locator("article").count() == 0
    page.set_input_files("#import-file", str(exported))
    page.wait_for_selector(".conversation.active")
    assert page.locator(".conversation.active .conversation-open").inner_text() == "Greetings"
    assert page.locator("article.user .content").inner_text() == "Hello there"
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".conversation").count() == 1


def test_import_rejects_a_file_that_is_not_an_export(page_factory: Any, web_server: ServerProcess,
                                                     tmp_path: Path) -> None:
    page = page_factory(web_server.base_url)
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    page.set_input_files("#import-file", str(bad))
    page.wait_for_selector("#banner:not([hidden])")
    assert "Import failed" in page.locator("#banner").inner_text()
    assert page.locator(".conversation").count() == 0


def test_malformed_meta_neither_breaks_import_nor_reload(page_factory: Any, web_server: ServerProcess,
                                                        tmp_path: Path) -> None:
    """A message's `meta` of the wrong types (hand-edited, another tool's export) is dropped on import,
    and an entry already stored broken is repaired or skipped when read back: every reload still works
    (page_factory fails the test on any uncaught page error)."""
    page = page_factory(web_server.base_url)
    bad_meta = {"tokensPerS": "fast", "ttftMs": {"x": 1}, "tokens": [3], "model": {"evil": 1}, "finish": 7}
    conv = {"title": "Odd meta", "messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello", "meta": bad_meta}]}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(conv))
    page.set_input_files("#import-file", str(path))
    page.wait_for_selector(".conversation.active")
    assert page.locator("article.assistant .content").inner_text() == "hello"
    assert "meta" not in stored(page)["messages"][1]
    # Entries stored broken by an older page: one with bad meta is shown, one without messages skipped.
    page.evaluate("""(meta) => {
        localStorage.setItem('dashchat.conversation.old1', JSON.stringify({id: 'old1', title: 'Stored odd',
            createdAt: 1, updatedAt: 9e12, system: '', messages: [{role: 'assistant', content: 'kept', meta}]}));
        localStorage.setItem('dashchat.conversation.old2', JSON.stringify({id: 'old2', title: 'No messages'}));
        localStorage.setItem('dashchat.conversation.old3', '{not json');
        const s = JSON.parse(localStorage.getItem('dashchat.settings'));
        s.lastConversation = 'old1';
        localStorage.setItem('dashchat.settings', JSON.stringify(s));
    }""", bad_meta)
    for _ in range(2):
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator(".conversation").count() == 2  # the import and the repaired one
        assert page.locator("article.assistant .content").inner_text() == "kept"
        assert page.locator("article.assistant .msg-meta").inner_text() == ""


def test_imported_reasoning_tool_call_and_html_render(page_factory: Any, web_server: ServerProcess,
                                                      tmp_path: Path) -> None:
    page = page_factory(web_server.base_url)
    conv = {"title": "Tools", "messages": [
        {"role": "user", "content": "Weather? " + EVIL},
        {"role": "assistant", "content": "", "reasoning": "Think about **weather**.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "<think>inner thoughts</think>It is 18 degrees. " + EVIL},
    ]}
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    page.set_input_files("#import-file", str(path))
    page.wait_for_selector(".tool-call")
    assert page.locator(".tool-call-name").inner_text() == "get_weather"
    assert json.loads(page.locator(".tool-call-args").inner_text()) == {"city": "Paris"}
    first, last = page.locator("article.assistant").first, page.locator("article.assistant").last
    assert not first.locator("details.reasoning").get_attribute("open")  # folded once done
    first.locator("details.reasoning summary").click()
    assert first.locator(".reasoning-body strong").inner_text() == "weather"
    assert last.locator(".reasoning-body").text_content().strip() == "inner thoughts"  # <think> in the content
    assert EVIL in last.locator(".content").inner_text()
    assert EVIL in page.locator("article.user .content").inner_text()
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__pwned") is None
    screenshot(page, "04-tool-call-reasoning")


def test_real_tool_call_streams_into_a_card(page_factory: Any, web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    set_extra_json(page, {"tools": [tool], "tool_choice": "required", "max_tokens": 60, "temperature": 0})
    send(page, "What is the weather in Paris?")
    answer = wait_answer_done(page)
    assert answer.locator(".tool-call-name").inner_text() == "get_weather"
    args = json.loads(answer.locator(".tool-call-args").inner_text())
    assert set(args) == {"city"}
    assert "tool_calls" in answer.locator(".msg-meta").inner_text()


def test_regenerate_and_edit_and_resend(page_factory: Any, web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url)
    set_extra_json(page, {"max_tokens": 8, "ignore_eos": True})
    send(page, "First question")
    wait_answer_done(page)
    with page.expect_request("**/v1/chat/completions") as req:
        page.click("article.assistant .regenerate")
    assert [m["content"] for m in json.loads(req.value.post_data)["messages"]] == ["First question"]
    wait_answer_done(page)
    msgs = stored(page)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[1]["content"]
    assert page.locator("article.assistant").count() == 1

    page.click("article.user .edit")
    page.fill(".edit-area", "Second question")
    page.click(".edit-box .btn.primary")
    wait_answer_done(page)
    msgs = stored(page)["messages"]
    assert [(m["role"], m["content"] if m["role"] == "user" else "") for m in msgs] == [
        ("user", "Second question"), ("assistant", "")]
    assert page.locator("article.user .content").inner_text() == "Second question"


def test_system_prompt_and_sampling_settings_reach_the_request(page_factory: Any, web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url)
    page.click("#toggle-settings")
    page.fill("#system-prompt", "You are terse.")
    page.fill("#max-tokens", "5")
    page.eval_on_selector("#temperature", "el => { el.value = '0.3'; el.dispatchEvent(new Event('input')); }")
    page.click("#close-settings")
    with page.expect_request("**/v1/chat/completions") as req:
        send(page, "Hi")
    body = json.loads(req.value.post_data)
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["max_tokens"] == 5 and body["temperature"] == 0.3 and body["top_p"] == 1
    assert body["stream"] is True
    answer = wait_answer_done(page)
    assert answer.locator(".error-card").count() == 0 and "TTFT" in answer.locator(".msg-meta").inner_text()
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#system-prompt").input_value() == "You are terse."


def test_context_too_long_is_explained(page_factory: Any, web_server: ServerProcess) -> None:
    """A new message the server refuses (400) is explained above the composer and given back to it."""
    page = page_factory(web_server.base_url)
    set_extra_json(page, {"max_tokens": 5000})  # the server's context is 1024
    send(page, "Hi")
    page.wait_for_selector("body[data-state='idle'] #composer-error:not([hidden])")
    card = page.locator("#composer-error").inner_text()
    assert "too long for the model" in card and "1024" in card, card
    assert page.locator("#composer-error .btn").count() == 0  # no Retry: the same request would fail again
    assert page.locator("#prompt").input_value() == "Hi" and page.locator("#messages article").count() == 0
    screenshot(page, "05-context-too-long")


def test_keyboard_enter_sends_shift_enter_adds_a_line(page_factory: Any, web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url)
    set_extra_json(page, {"max_tokens": 4})
    page.click("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.locator("#prompt").input_value() == "line one\nline two"
    assert page.locator("article").count() == 0
    page.keyboard.press("Enter")
    wait_answer_done(page)
    assert stored(page)["messages"][0]["content"] == "line one\nline two"
    assert page.locator("#prompt").input_value() == ""


def test_phone_sized_screen(page_factory: Any, web_server: ServerProcess) -> None:
    page = page_factory(web_server.base_url, viewport={"width": 390, "height": 780}, is_mobile=True, has_touch=True)
    set_extra_json(page, {"max_tokens": 24})
    send(page, "Hello from a phone")
    wait_answer_done(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways: {width}px"
    box = page.locator("#composer").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 780
    assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < -200
    screenshot(page, "06-phone")
    page.click("#toggle-sidebar")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    assert page.locator(".conversation").count() == 1
    screenshot(page, "07-phone-list")
    page.click(".conversation-open")  # choosing a conversation closes the drawer
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x < 0")


def test_api_key_asked_for_wrong_one_refused_right_one_works(page_factory: Any, keyed_server: ServerProcess) -> None:
    base = keyed_server.base_url
    assert httpx.get(base + "/").status_code == 200  # the page itself needs no key
    assert httpx.get(base + "/v1/models").status_code == 401
    page = page_factory(base)
    banner = page.locator("#banner")
    assert "needs an API key" in banner.inner_text()
    screenshot(page, "08-key-asked")
    banner.locator(".key-input").fill("sk-wrong")
    banner.locator("button[type=submit]").click()
    page.wait_for_function("() => document.getElementById('banner').textContent.includes('not accepted')")
    assert page.locator("#model-select option").count() == 0
    banner.locator(".key-input").fill(API_KEY)
    banner.locator("button[type=submit]").click()
    page.wait_for_selector("#banner", state="hidden")
    assert page.locator("#model-select option").count() == 1
    set_extra_json(page, {"max_tokens": 8})
    send(page, "Hello")
    answer = wait_answer_done(page)
    assert answer.locator(".error-card").count() == 0 and stored(page)["messages"][1]["content"]

    # a key that stops working mid-conversation: the answer says so and takes a new key in place
    page.click("#toggle-settings")
    page.fill("#api-key", "sk-revoked")
    page.press("#api-key", "Tab")
    page.click("#close-settings")
    send(page, "Again")
    answer = wait_answer_done(page)
    assert "needs a valid API key" in answer.locator(".error-card").inner_text()
    screenshot(page, "09-key-refused")
    answer.locator(".key-input").fill(API_KEY)
    answer.locator(".key-form button").click()
    answer = wait_answer_done(page)
    assert answer.locator(".error-card").count() == 0 and stored(page)["messages"][-1]["content"]


def test_busy_server_429_is_explained(page_factory: Any, keyed_server: ServerProcess) -> None:
    """One running and one waiting request fill the keyed server (1 sequence, queue of 1): the page's is the third."""
    base = keyed_server.base_url
    page = page_factory(base)
    page.locator("#banner .key-input").fill(API_KEY)
    page.locator("#banner button[type=submit]").click()
    page.wait_for_selector("#banner", state="hidden")
    set_extra_json(page, {"max_tokens": 8})
    long = {"model": page.locator("#model-select").input_value(), "stream": True, "max_tokens": 900,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Go on and on."}]}
    # Raw sockets: the waiting request gets no response headers until it runs, so an HTTP client would block.
    held = []
    try:
        # one after the other: requests not yet admitted count against the queue
        for running, waiting in ((1, 0), (1, 1)):
            held.append(hold_request(keyed_server.port, long))
            deadline = time.monotonic() + 60
            while (metric(base, "dashchat_num_requests_running"),
                   metric(base, "dashchat_num_requests_waiting")) != (running, waiting):
                assert time.monotonic() < deadline, f"the server never had {running} running, {waiting} waiting"
                time.sleep(0.05)
        send(page, "Hello")
        answer = wait_answer_done(page)
        card = answer.locator(".error-card").inner_text()
        assert "The server is busy" in card and "Try again in" in card, card
        screenshot(page, "10-busy")
    finally:
        for sock in held:
            sock.close()  # the server sees the disconnects and aborts both
    assert wait_engine_idle(base, timeout=30) == (0, 0)
    answer.locator(".error-card .btn").click()  # Retry, now that the server is free
    answer = wait_answer_done(page)
    assert answer.locator(".error-card").count() == 0
