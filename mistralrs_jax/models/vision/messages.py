"""OpenAI chat messages with image parts -> a prompt with one image placeholder per image.

Image parts are `{"type": "image_url", "image_url": {"url": ...}}` (OpenAI; also a bare URL
string), `{"type": "image_pil", "image_pil": PIL.Image}` (vLLM's LLM.chat) and
`{"type": "image", "image": <URL, path or PIL image>}`. Each becomes `{"type": "image"}`, the
part multimodal chat templates (LLaVA's among them) turn into the image token. A template
that takes text only gets, as vLLM does for such templates, each message's image tokens on
their own lines before its text.
"""
from __future__ import annotations

from typing import Any, Sequence

from ...errors import ImageError, InvalidRequestError

IMAGE_PART_TYPES = ("image_url", "image_pil", "image", "input_image")


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


def _text_only(messages: list[dict[str, Any]], image_token: str) -> list[dict[str, Any]]:
    """Each message's parts as one string: its image tokens, one per line, then its text parts."""
    flattened = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            lines = [image_token for part in content if isinstance(part, dict) and part.get("type") == "image"]
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
    if text is None or text.count(image_token) != num_images:
        text = render(_text_only(messages, image_token))
    if text.count(image_token) != num_images:
        raise ImageError(f"the chat template placed {text.count(image_token)} image tokens ({image_token!r}) for "
                         f"{num_images} image(s); pass a chat template that places one per image part "
                         "(--chat-template)")
    return text
