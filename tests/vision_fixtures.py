"""Shared by the LLaVA tests (test_vision.py, test_vision_server.py, test_llava_next.py) and
test_idefics2.py: tiny random LLaVA checkpoints built by transformers itself, image and chat
helpers, and session-scoped fixtures (one engine per checkpoint for the whole run).

Loaded with `pytest_plugins = ["vision_fixtures"]`.

The LLaVA 1.5 checkpoint is a tiny random `LlavaForConditionalGeneration` (a 3-layer CLIP ViT on
56-px images with 14-px patches, so 16 image tokens; the 2-layer llama of family_fixtures), saved
with `save_pretrained` next to a `LlavaProcessor` (CLIP image processor, the family_fixtures
tokenizer plus an `<image>` token, a LLaVA-style chat template that places images with
`selectattr('type', ...)`). Every reference value comes from transformers: the processor's
pixel_values and input_ids, `get_image_features`, the model's logits and `generate`.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import COMMON, UNK_ID, build_checkpoint, write_tokenizer

IMAGE_SIZE = 56  # 4 x 4 patches of 14 px: 16 image tokens (the class token is dropped)
NEXT_TILE = 28  # LLaVA-NeXT: 2 x 2 patches per tile
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
IMAGE_TOKEN_ID = 128  # added after the 128-piece family_fixtures vocabulary
TEXT_VOCAB = 136
STEP_TOKENS = 32  # the engine's token budget: prompts of 50-60 tokens prefill in two chunks
NEW_TOKENS = 16
# A LLaVA-1.5-style template (USER: <image>\n... ASSISTANT:), written for these tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}{{ message['role'] | upper }}: "
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }} {% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QUESTION = "What is in this picture?"
# With this system prompt the 16 image tokens sit at positions 27-42: across the first chunk boundary.
SYSTEM = "You look at pictures."



def random_images(seed: int = 0) -> list:
    """Noise images of several sizes and aspect ratios, plus RGBA, grayscale and palette ones."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def noise(height, width, channels=3):
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)

    smooth = np.kron(noise(8, 12), np.ones((25, 25, 1), np.uint8))  # blocky, like a real picture's regions
    return [Image.fromarray(noise(40, 90)), Image.fromarray(noise(120, 60)), Image.fromarray(noise(56, 56)),
            Image.fromarray(smooth), Image.fromarray(noise(13, 7)),
            Image.fromarray(noise(70, 50, 4), mode="RGBA"), Image.fromarray(noise(64, 80)[..., 0], mode="L"),
            Image.fromarray(noise(33, 77)).convert("P", palette=Image.Palette.ADAPTIVE)]


def randomize(model, seed: int) -> None:
    """Every weight drawn afresh (transformers' init leaves biases 0 and norms 1, hiding a missing one)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            elif any(key in name for key in ("embed_tokens", "class_embedding", "position_embedding")):
                param.copy_(noise)
            else:  # projections and the patch convolution: unit-scale outputs; a sharp lm_head
                gain = 3.0 if name.startswith("lm_head") else 1.0
                param.copy_(noise * gain / math.sqrt(math.prod(param.shape[1:])))


def build_llava_checkpoint(directory: Path, seed: int = 0, next_version: bool = False) -> Path:
    """LLaVA 1.5, or with `next_version` LLaVA-NeXT (28-px tiles of 2 x 2 patches, the default pinpoints
    scaled down 12x)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    write_tokenizer(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_special_tokens(["<image>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    assert tokenizer.token_to_id("<image>") == IMAGE_TOKEN_ID
    # The fast tokenizer over tokenizer.json as is, so transformers and the engine tokenize alike.
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, image_token="<image>")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))

    size = NEXT_TILE if next_version else IMAGE_SIZE
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=size, patch_size=14)
    text = transformers.LlamaConfig(**dict(COMMON, vocab_size=TEXT_VOCAB))
    torch.manual_seed(seed)
    sizes = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if next_version:
        model = transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
            image_grid_pinpoints=NEXT_PINPOINTS))
        image_processor = transformers.LlavaNextImageProcessor(image_grid_pinpoints=NEXT_PINPOINTS, **sizes)
        processor_class = transformers.LlavaNextProcessor
    else:
        model = transformers.LlavaForConditionalGeneration(
            transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID))
        image_processor = transformers.CLIPImageProcessor(**sizes)
        processor_class = transformers.LlavaProcessor
    randomize(model, seed)
    model.save_pretrained(directory)
    processor = processor_class(
        image_processor=image_processor, tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(directory)
    return directory


def image_chat(image, system: str | None = SYSTEM, question: str = QUESTION, part: str = "image_pil") -> list[dict]:
    content = {"image_pil": {"type": "image_pil", "image_pil": image},
               "image_url": {"type": "image_url", "image_url": {"url": image}}}[part]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": [content, {"type": "text", "text": question}]}]


def reference_chat(image, system: str | None = SYSTEM, question: str = QUESTION) -> list[dict]:
    """The same conversation as transformers' processor takes it (image parts without the image)."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def data_url(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()



# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory) -> Path:
    return build_llava_checkpoint(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="session")
def reference(llava_dir):
    """transformers' processor and model (f32, eager attention)."""
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        llava_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return processor, model


@pytest.fixture(scope="session")
def llava_llm(llava_dir):
    from mistralrs_jax import LLM

    llm = LLM(str(llava_dir), max_seqs=4, token_buckets=[2, 8, STEP_TOKENS], max_num_batched_tokens=STEP_TOKENS,
              pa_ctxt_len=1024)
    try:
        yield llm
    finally:
        llm.shutdown()


def reference_inputs(reference, image, **chat):
    processor, _ = reference
    text = processor.apply_chat_template(reference_chat(image, **chat), add_generation_prompt=True)
    return text, processor(images=image, text=text, return_tensors="pt")


def reference_greedy(reference, inputs) -> list[int]:
    """transformers' greedy decoding, never stopping at EOS (`inputs` carries the attention mask:
    the prompts hold <unk> = pad tokens, which an inferred mask would hide)."""
    import torch

    _, model = reference
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=UNK_ID)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="session")
def text_llm(tmp_path_factory):
    """A text-only model (family_fixtures' tiny llama) for the 'no images here' paths."""
    from mistralrs_jax import LLM

    directory = build_checkpoint("llama2", tmp_path_factory.mktemp("text") / "tiny-llama")
    llm = LLM(str(directory), max_seqs=2, token_buckets=[2, 8, 32], max_num_batched_tokens=32, pa_ctxt_len=512)
    try:
        yield llm
    finally:
        llm.shutdown()
