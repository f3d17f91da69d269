"""LLaVA 1.5 through the HTTP server against transformers: image chats, limits, local files,
and a text-only model refusing images (checkpoint and reference from vision_fixtures.py)."""
from __future__ import annotations

import pytest

from vision_fixtures import NEW_TOKENS, QUESTION, SYSTEM, data_url, image_chat, random_images, reference_greedy, \
    reference_inputs

pytest_plugins = ["vision_fixtures"]


def _serve(llm):
    from server.app import create_app
    from server.serving import BackgroundServer

    return BackgroundServer(create_app(llm)).start()


def test_server_answers_image_chats_like_transformers(llava_llm, reference):
    import openai

    images = random_images()
    want = reference_greedy(reference, reference_inputs(reference, images[5])[1])
    want_text = llava_llm.tokenizer.decode(want)
    background = _serve(llava_llm)
    try:
        client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[5])}},
                                                 {"type": "text", "text": QUESTION}]}]
        kwargs = dict(model=llava_llm.model_name, temperature=0, max_tokens=NEW_TOKENS, extra_body={"ignore_eos": True})
        reply = client.chat.completions.create(messages=messages, **kwargs)
        assert reply.choices[0].message.content == want_text
        assert reply.usage.prompt_tokens == reference_inputs(reference, images[5])[1]["input_ids"].shape[1]
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in
                           client.chat.completions.create(messages=messages, stream=True, **kwargs) if chunk.choices)
        assert streamed == want_text

        bad = [dict(messages[1], content=[{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                          {"type": "text", "text": QUESTION}])]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(messages=bad, **kwargs)
        assert caught.value.status_code == 400
        assert caught.value.body["code"] == "invalid_image" and caught.value.body["param"] == "messages"
        missing_url = [dict(messages[1], content=[{"type": "image_url"}, {"type": "text", "text": QUESTION}])]
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(messages=missing_url, **kwargs)
        # Still serving, and still right.
        assert client.chat.completions.create(messages=messages, **kwargs).choices[0].message.content == want_text
    finally:
        background.stop()


def test_too_many_images_are_refused_before_the_vision_tower_runs(llava_llm, monkeypatch):
    """A prompt whose image tokens alone overflow the context is refused by the engine's own length
    check, without encoding a single image (the tower is the expensive part of an image request)."""
    from mistralrs_jax import SamplingParams
    from mistralrs_jax.errors import PromptTooLongError

    encoded = []
    encode = llava_llm.vision.encode_images
    monkeypatch.setattr(llava_llm.vision, "encode_images", lambda images: encoded.append(len(images)) or encode(images))
    count = llava_llm.max_model_len // llava_llm.vision.tokens_per_image + 1
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}
             for image in (random_images() * count)[:count]]
    with pytest.raises(PromptTooLongError):
        llava_llm.chat([{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}])
    assert encoded == []
    llava_llm.chat(image_chat(random_images()[0]), SamplingParams(max_tokens=1))  # one image still fits
    assert encoded == [1]


def test_server_reads_local_images_only_under_the_allowed_directory(llava_llm, tmp_path):
    """A client must not make the server read its files: image paths and file:// URLs are refused
    unless --allowed-local-media-path names a directory holding them (the Python API reads any)."""
    import httpx

    from server.app import create_app
    from server.serving import BackgroundServer

    allowed, elsewhere = tmp_path / "media", tmp_path / "private"
    allowed.mkdir()
    elsewhere.mkdir()
    image = random_images()[2]
    for directory in (allowed, elsewhere):
        image.save(directory / "picture.png")

    def chat(url: str) -> dict:
        return {"model": "default", "max_tokens": 2, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]}

    for local_media, readable in ((None, ()), (str(allowed), (allowed,))):
        background = BackgroundServer(create_app(llava_llm, allowed_local_media_path=local_media)).start()
        try:
            http = httpx.Client(base_url=background.url, timeout=120)
            for directory in (allowed, elsewhere):
                for url in (str(directory / "picture.png"), f"file://{directory / 'picture.png'}",
                            f"{allowed}/../{directory.name}/picture.png"):
                    response = http.post("/v1/chat/completions", json=chat(url))  # ".." resolves before the check
                    assert response.status_code == (200 if directory in readable else 400), (local_media, url)
                    if response.status_code == 400:
                        assert response.json()["error"]["code"] == "invalid_image"
            assert http.post("/v1/chat/completions", json=chat(data_url(image))).status_code == 200
        finally:
            background.stop()


def test_text_only_model_refuses_images(text_llm):
    import openai

    from mistralrs_jax.errors import ImageError

    image = random_images()[0]
    with pytest.raises(ImageError, match="text-only"):
        text_llm.chat(image_chat(image))
    background = _serve(text_llm)
    try:
        client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                 {"type": "text", "text": QUESTION}]}]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=text_llm.model_name, messages=messages, max_tokens=4)
        assert caught.value.body["code"] == "images_not_supported"
        reply = client.chat.completions.create(model=text_llm.model_name, max_tokens=4,
                                               messages=[{"role": "user", "content": QUESTION}])
        assert reply.choices[0].finish_reason == "length"
    finally:
        background.stop()
