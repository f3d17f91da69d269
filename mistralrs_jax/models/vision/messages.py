"""OpenAI chat messages with image parts -> a prompt with one image placeholder per image.

Image parts are `{"type": "image_url", "image_url": {"url": ...}}` (OpenAI; also a bare URL
string), `{"type": "image_pil", "image_pil": PIL.Image}` (vLLM's LLM.chat) and
`{"type": "image", "image": <URL, path or PIL image>}`. Each becomes `{"type": "image"}`, the
part multimodal chat templates (LLaVA's among them) turn into the image token. A template
that takes text only gets, as vLLM does for such templates, each message's image tokens on
their own lines before its text. A model whose prompts number their images (Phi-3 Vision's
`<|image_1|>`, ...) also takes those tags written in the text, which then place the images.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from ...errors import ImageError, InvalidRequestError

IMAGE_PART_TYPES = ("image_url", "image_pil", "image", "input_image")
# Models whose prompts number their images (Phi-3 Vision: "<|image_1|>", "<|image_2|>", ..., as its
# processor and mistral.rs take them): model image token -> the numbered tag. Numbered tags written
# in the text place the images (1 to N, in order); each becomes the model's image token.
NUMBERED_IMAGE_TAGS = {"<|image|>": re.compile(r"<\|image_(\d+)\|>")}


def _image_source(part: dict[str, Any], where: str) -> Any:
    kind = part.get("type")
    value = part.get(kind)
    if kind in ("image_url", "input_image"):
        value = value.get("url") if isinstance(value, dict) else value
        if not isinstance(value, str) or not value:
            raise ImageError(f"{where}: an {kind} part needs {{\"{kind}\": {{\"url\": \"data:...\" or "
                             "\"https://...\"}}")
        return value
    if value is None:
        raise ImageError(f"{where}: an {kind} part needs its image under {kind!r}")
    return value


def split_image_parts(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with every image part replaced by {"type": "image"}, the image sources in prompt order)."""
    prepared, images = [], []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            prepared.append(message)
            continue
        parts = []
        for part_index, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                images.append(_image_source(part, f"messages[{index}].content[{part_index}]"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        prepared.append({**message, "content": parts})
    return prepared, images


def _text_only(messages: list[dict[str, Any]], image_token: str, tagged: bool = False) -> list[dict[str, Any]]:
    """Each message's parts as one string: its image tokens, one per line (none when the text
    places the images with numbered tags), then its text parts."""
    flattened = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            lines = [image_token for part in content
                     if isinstance(part, dict) and part.get("type") == "image" and not tagged]
            lines += [part["text"] if isinstance(part, dict) else str(part) for part in content
                      if not (isinstance(part, dict) and part.get("type") == "image")
                      and (not isinstance(part, dict) or isinstance(part.get("text"), str))]
            message = {**message, "content": "\n".join(lines)}
        flattened.append(message)
    return flattened


def render_with_images(render, messages: list[dict[str, Any]], num_images: int, image_token: str) -> str:
    """The prompt text with exactly one `image_token` per image. `render(messages) -> str` is the
    model's chat template; it is tried with the image parts first, then with text only."""
    try:
        text = render(messages)
    except InvalidRequestError:  # a template that takes text only refuses non-text parts
        text = None
    if text is not None:
        text = _numbered_tags_to_token(text, num_images, image_token)
    if text is None or text.count(image_token) != num_images:
        tags = NUMBERED_IMAGE_TAGS.get(image_token)
        tagged = tags is not None and any(tags.search(part) for part in _texts(messages))
        text = _numbered_tags_to_token(render(_text_only(messages, image_token, tagged)), num_images, image_token)
    if text.count(image_token) != num_images:
        raise ImageError(f"the chat template placed {text.count(image_token)} image tokens ({image_token!r}) for "
                         f"{num_images} image(s); pass a chat template that places one per image part "
                         "(--chat-template)")
    return text


def _texts(messages: list[dict[str, Any]]):
    """Every text in the messages (string contents and text parts)."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def _numbered_tags_to_token(text: str, num_images: int, image_token: str) -> str:
    """The prompt with its numbered image tags (a model in NUMBERED_IMAGE_TAGS) as the image token;
    the tags must number the images 1 to N, once each, in order."""
    tags = NUMBERED_IMAGE_TAGS.get(image_token)
    numbers = [int(n) for n in tags.findall(text)] if tags is not None else []
    if not numbers:
        return text
    if numbers != list(range(1, num_images + 1)):
        raise ImageError(f"the prompt's image tags number the images {numbers} for {num_images} image(s): write "
                         f"<|image_1|> to <|image_{num_images}|>, once each, in order")
    return tags.sub(image_token, text)
