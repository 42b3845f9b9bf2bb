"""Images in the chat page, in a real headless chromium against a real server (SmolLM2-135M, text only).

Attaching (file picker, a paste event, a drop event), the thumbnails, the request the page really sends
(seen on the wire with page.on("request"), not mocked), the text-only model's 400 shown with the message
kept for another try, and a conversation with an image through import, reload, export and import.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
from conftest import screenshot
from PIL import Image
from server_proc import ServerProcess

# A paste or a drop as the browser delivers it: a DataTransfer holding a PNG made on a canvas.
SYNTHETIC_EVENT = """([kind, colour]) => new Promise((resolve) => {
    const canvas = document.createElement('canvas');
    canvas.width = 40; canvas.height = 30;
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = colour; ctx.fillRect(0, 0, 40, 30);
    canvas.toBlob((blob) => {
        const dt = new DataTransfer();
        dt.items.add(new File([blob], kind + '.png', {type: 'image/png'}));
        const target = document.getElementById('prompt');
        if (kind === 'paste') {
            target.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        } else {
            target.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
            target.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }
        resolve();
    }, 'image/png');
})"""


def png_data_url(width: int, height: int, colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head
    return Image.open(io.BytesIO(base64.b64decode(data)))


def chat_requests(page: Any) -> list[dict[str, Any]]:
    """Every chat request body the page sends from now on, as it left the browser."""
    seen: list[dict[str, Any]] = []
    page.on("request", lambda r: seen.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    return seen


def stored(page: Any) -> dict[str, Any] | None:
    return page.evaluate("""() => {
        const id = JSON.parse(localStorage.getItem('dashchat.settings')).lastConversation;
        return JSON.parse(localStorage.getItem('dashchat.conversation.' + id));
    }""")


def test_attach_send_and_the_refusal_keeps_the_draft(page_factory: Any, web_server: ServerProcess,
                                                     tmp_path: Path) -> None:
    page = page_factory(web_server.base_url)
    big = tmp_path / "wide.png"
    Image.new("RGB", (2000, 1200), (200, 30, 30)).save(big)  # past the longest side the page keeps
    page.set_input_files("#attach-file", str(big))
    page.wait_for_selector("#attachments .thumb")
    page.evaluate(SYNTHETIC_EVENT, ["paste", "#1e9f3c"])
    page.wait_for_function("() => document.querySelectorAll('#attachments .thumb').length === 2")
    page.evaluate(SYNTHETIC_EVENT, ["drop", "#1e3c9f"])
    page.wait_for_function("() => document.querySelectorAll('#attachments .thumb').length === 3")
    assert page.url.startswith(web_server.base_url)  # the drop did not navigate to the file
    page.locator("#attachments .remove-attachment").nth(1).click()  # the pasted one
    assert page.locator("#attachments .thumb").count() == 2
    screenshot(page, "20-attachments")

    sent = chat_requests(page)
    page.fill("#prompt", "What colour is this?")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#composer-error:not([hidden])")
    assert len(sent) == 1
    content = sent[0]["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["text", "image_url", "image_url"]
    assert content[0]["text"] == "What colour is this?"
    wide, dropped = (decode(p["image_url"]["url"]) for p in content[1:])
    assert wide.size == (1568, 941)  # scaled down to 1568 px on its longest side
    assert wide.convert("RGB").getpixel((700, 400)) == (200, 30, 30)
    assert dropped.size == (40, 30) and dropped.convert("RGB").getpixel((5, 5)) == (0x1E, 0x3C, 0x9F)

    # The same request straight to the server: the page shows the server's own message.
    r = httpx.post(f"{web_server.base_url}/v1/chat/completions", json=sent[0], timeout=60)
    assert r.status_code == 400, r.text
    told = page.locator("#composer-error").inner_text()
    assert "400" in told and r.json()["error"]["message"] in told, told
    screenshot(page, "21-refused")
    # ...and the message is back in the composer, images included, ready for another model
    assert page.locator("#prompt").input_value() == "What colour is this?"
    assert page.locator("#attachments .thumb").count() == 2
    assert page.locator("#messages article").count() == 0
    assert page.locator(".conversation").count() == 0  # an empty conversation is not kept
    page.click("#composer-error button")
    assert page.locator("#composer-error").is_hidden()


def test_image_conversation_through_import_reload_export(page_factory: Any, web_server: ServerProcess,
                                                         tmp_path: Path) -> None:
    page = page_factory(web_server.base_url)
    image = png_data_url(64, 48, (10, 120, 240))
    conv = {"title": "Picture", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                     {"type": "image_url", "image_url": {"url": image}}]},
        {"role": "assistant", "content": "A blue rectangle."},
    ]}
    path = tmp_path / "picture.json"
    path.write_text(json.dumps(conv))
    page.set_input_files("#import-file", str(path))
    page.wait_for_selector("article.user .msg-images .thumb")

    # localStorage holds a reference, IndexedDB the data
    message = stored(page)["messages"][0]
    assert message["content"] == "Describe it." and image not in json.dumps(message)
    ref = message["images"][0]["ref"]
    assert ref == page.evaluate("(url) => window.dashchat.images.refOf(url)", image)

    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    thumb = page.locator("article.user .msg-images .thumb")
    page.wait_for_function("() => document.querySelector('article.user .thumb').naturalWidth === 64")
    assert thumb.get_attribute("src") == image
    screenshot(page, "22-image-after-reload")

    # Regenerating sends the stored image again; the text model refuses it in the answer's place.
    sent = chat_requests(page)
    page.click("article.assistant .regenerate")
    page.wait_for_selector("body[data-state='idle'] article.assistant .error-card")
    assert sent[0]["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": image}}
    assert "400" in page.locator("article.assistant .error-card").inner_text()

    with page.expect_download() as download:
        page.click("#export-all")
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    parts = json.loads(exported.read_text())["conversations"][0]["messages"][0]["content"]
    assert parts == [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": image}}]

    page.click(".conversation.active .delete")
    page.click(".conversation.active .delete.armed")
    page.wait_for_function("""(ref) => new Promise((resolve) => {
        const req = indexedDB.open('dashchat');
        req.onsuccess = () => {
            const get = req.result.transaction('images').objectStore('images').get(ref);
            get.onsuccess = () => resolve(get.result === undefined);
        };
    })""", arg=ref)  # no conversation names it any more
    page.set_input_files("#import-file", str(exported))
    page.wait_for_function("() => document.querySelector('article.user .thumb')?.naturalWidth === 64")


def test_import_refuses_images_that_are_not_image_data(page_factory: Any, web_server: ServerProcess,
                                                       tmp_path: Path) -> None:
    page = page_factory(web_server.base_url)
    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg onload='window.__pwned=1'/>").decode()
    for i, url in enumerate(["http://example.invalid/track.png", svg, "data:text/html;base64,PGI+eDwvYj4=",
                             "javascript:alert(1)", "data:image/png;base64,not base64!"]):
        conv = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(conv))
        page.set_input_files("#import-file", str(path))
        page.wait_for_function("() => document.getElementById('banner').textContent.includes('Import failed')")
        assert "not a data: URL of a PNG" in page.locator("#banner").inner_text(), url
        page.evaluate("document.getElementById('banner').textContent = ''")
    assert page.locator(".conversation").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_content_hash_is_sha256_with_or_without_crypto_subtle(page_factory: Any, web_server: ServerProcess) -> None:
    """The page's own SHA-256 (for plain-http LAN pages, where crypto.subtle is missing) agrees with it."""
    page = page_factory(web_server.base_url)
    mismatches = page.evaluate("""async () => {
        const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
        const bad = [];
        for (const n of [0, 1, 55, 56, 63, 64, 65, 1000, 100003]) {
            const bytes = Uint8Array.from({length: n}, (_, i) => (i * 7 + n) & 255);
            const want = hex(new Uint8Array(await crypto.subtle.digest('SHA-256', bytes)));
            if (hex(window.dashchat.images.sha256(bytes)) !== want) bad.push(n);
        }
        return bad;
    }""")
    assert mismatches == []
