"""Images through the real server on a tiny random Qwen2-VL (the embedded Qwen's tokenizer and chat
template), driven by the official openai and anthropic SDKs: base64 PNGs made with Pillow, the
answer equal to transformers' greedy one, image tokens counted in usage and /tokenize, images with
tools, Responses' input_image and Anthropic's image blocks, and every bad image a 400 in the API's
own shape (URL fetching itself is tested in test_image_fetch.py)."""

from __future__ import annotations

import base64

import anthropic
import httpx
import openai
import pytest
import torch
from openai import OpenAI
from server_proc import ServerProcess, running

from dashchat.models.image_processing import ImageProcessorConfig, open_image, preprocess
from tiny_qwen2_vl import IMAGE_PAD, png, save_tiny_vl

MAX_PIXELS = 28 * 28 * 16


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-vl-server")
    return path, save_tiny_vl("qwen2-vl", path)


@pytest.fixture(scope="module")
def vl_server(vl_model):
    path, _ = vl_model
    yield from running("--model-path", str(path), "--device", "cpu", "--kv-cache-memory", "0.1",
                       "--max-model-len", "1024", "--served-model-name", "tiny-vl",
                       "--limit-mm-per-prompt", '{"image": 2}', "--mm-max-pixels", str(MAX_PIXELS),
                       "--media-max-bytes", "100000")


@pytest.fixture(scope="module")
def client(vl_server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{vl_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, *images: bytes) -> dict:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(i), "detail": "auto"}} for i in images]
    return {"role": "user", "content": parts}


def test_answer_equals_transformers_and_usage_counts_image_tokens(client, vl_server, vl_model):
    _, ref = vl_model
    picture = png(100, 70, seed=11)
    messages = [image_message("What is in this picture?", picture)]
    r = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    tokens = httpx.post(f"{vl_server.base_url}/tokenize", json={"model": "tiny-vl", "messages": messages}).json()
    img = preprocess(open_image(picture, 10**8), ImageProcessorConfig(max_pixels=MAX_PIXELS))
    n_image = img.num_tokens(2)
    assert tokens["tokens"].count(IMAGE_PAD) == n_image
    assert r.usage.prompt_tokens == tokens["count"] and r.usage.completion_tokens == 6
    ids = tokens["tokens"]
    with torch.inference_mode():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(img.pixel_values),
                           image_grid_thw=torch.tensor([img.grid]), max_new_tokens=6, min_new_tokens=6,
                           do_sample=False, mm_token_type_ids=torch.tensor([[int(t == IMAGE_PAD) for t in ids]]))
    expected = out[0, len(ids):].tolist()
    from dashchat.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(vl_model[0])
    assert r.choices[0].message.content == tok.decode(expected)
    # the same image again, streamed: its blocks come from the prefix cache, the answer is the same
    chunks = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_typed_placeholder_text_is_not_an_image(vl_server):
    messages = [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|> hi"}]
    tokens = httpx.post(f"{vl_server.base_url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert IMAGE_PAD not in tokens


def test_image_with_tools_and_two_images(client):
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}}
    r = client.chat.completions.create(
        model="tiny-vl", messages=[image_message("Weather where this was taken?", png(56, 84, seed=12),
                                                 png(84, 56, seed=13))],
        tools=[weather], tool_choice="required", max_tokens=60, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"


def test_responses_and_anthropic_images(vl_server):
    picture = png(70, 70, seed=14)
    oa = OpenAI(base_url=f"{vl_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    resp = oa.responses.create(model="tiny-vl", max_output_tokens=4, input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Describe."}, {"type": "input_image", "image_url": data_url(picture)}]}])
    an = anthropic.Anthropic(base_url=vl_server.base_url, api_key="unused", max_retries=0)
    content = [{"type": "text", "text": "Describe."},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": base64.b64encode(picture).decode()}}]
    msg = an.messages.create(model="tiny-vl", max_tokens=4, messages=[{"role": "user", "content": content}])
    counted = an.messages.count_tokens(model="tiny-vl", messages=[{"role": "user", "content": content}])
    assert resp.usage.input_tokens == msg.usage.input_tokens == counted.input_tokens
    assert counted.input_tokens > 20  # 25 image tokens among them


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,not*base64", "base64"),
    (data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "could not be read"),
    (data_url(b"plain text, no picture", "text/plain"), "not an image"),
    ("https://example.com/cat.png", "not allowed"),
    ("file:///etc/passwd", "data:"),
])
def test_bad_images_are_400s(client, url, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-vl", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}])
    assert words in err.value.message


def big_pictures() -> tuple[bytes, bytes]:
    """A PNG over --media-max-bytes, and a small file of a picture over 8192 x 8192 pixels."""
    import io

    from PIL import Image

    noisy = png(300, 300, seed=15)  # 270 kB of random pixels
    buf = io.BytesIO()
    Image.new("1", (8200, 8200)).save(buf, "PNG")  # one bit a pixel, compresses to a few kB
    return noisy, buf.getvalue()


def test_too_large_images(client):
    noisy, huge = big_pictures()
    assert len(noisy) > 100000 and len(huge) < 100000
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-vl", max_tokens=2, messages=[image_message("big", noisy)])
    assert "larger than 100000 bytes" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-vl", max_tokens=2, messages=[image_message("huge", huge)])
    assert "8200x8200" in err.value.message


def test_too_many_images_and_anthropic_error_shape(client, vl_server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-vl", max_tokens=2, messages=[
            image_message("three", png(56, 56, seed=1), png(56, 56, seed=2), png(56, 56, seed=3))])
    assert "At most 2 images" in err.value.message
    an = anthropic.Anthropic(base_url=vl_server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as aerr:
        an.messages.create(model="tiny-vl", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@"}}]}])
    assert aerr.value.body["type"] == "error" and "base64" in aerr.value.body["error"]["message"]


def test_text_only_model_refuses_images(server, model_name):
    """SmolLM2 (the shared text server) names itself in the refusal."""
    r = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": model_name, "max_tokens": 2, "messages": [image_message("hi", png(56, 56, seed=1))]})
    assert r.status_code == 400 and model_name in r.json()["error"]["message"]


def test_ollama_chat_images(client, vl_server):
    """Ollama's /api/chat takes bare base64 images on a message: counted like the chat API's."""
    picture = png(70, 70, seed=16)
    r = httpx.post(f"{vl_server.base_url}/api/chat", timeout=60, json={
        "model": "tiny-vl", "stream": False, "options": {"num_predict": 2},
        "messages": [{"role": "user", "content": "Describe.", "images": [base64.b64encode(picture).decode()]}]})
    chat = client.chat.completions.create(model="tiny-vl", max_tokens=2, messages=[image_message("Describe.", picture)])
    assert r.status_code == 200 and r.json()["prompt_eval_count"] == chat.usage.prompt_tokens
