"""LLaVA 1.5 against transformers: preprocessing, vision features, logits, greedy generation, server.

The checkpoint is a tiny random `LlavaForConditionalGeneration` built by transformers itself
(a 3-layer CLIP ViT on 56-px images with 14-px patches, so 16 image tokens; the 2-layer llama of
family_fixtures), saved with `save_pretrained` next to a `LlavaProcessor` (CLIP image processor,
the family_fixtures tokenizer plus an `<image>` token, a LLaVA-style chat template that places
images with `selectattr('type', ...)`). Every reference value comes from transformers: the
processor's pixel_values and input_ids, `get_image_features`, the model's logits and `generate`.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import math
import threading
import time
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


def _randomize(model, seed: int) -> None:
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
    _randomize(model, seed)
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


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return build_llava_checkpoint(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def reference(llava_dir):
    """transformers' processor and model (f32, eager attention)."""
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        llava_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return processor, model


@pytest.fixture(scope="module")
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


# --------------------------------------------------------------------------- (a) preprocessing


def test_preprocessing_matches_transformers_image_processors():
    """CLIP (shortest edge + center crop), LLaVA 1.5's pad-to-square at 336 px, and an exact resize
    without crop, on images of many sizes, aspect ratios and modes: bit-identical pixel_values."""
    import transformers.models.clip.image_processing_pil_clip as clip_pil
    import transformers.models.llava.image_processing_pil_llava as llava_pil

    from mistralrs_jax.models.vision.image_processing import ImageProcessorConfig, preprocess_image

    processors = [
        clip_pil.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        llava_pil.LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336},
                                         crop_size={"height": 336, "width": 336}),
        clip_pil.CLIPImageProcessorPil(size={"height": 40, "width": 64}, do_center_crop=False),
    ]
    for processor in processors:
        config = ImageProcessorConfig.from_dict(processor.to_dict())
        assert config.do_pad == bool(getattr(processor, "do_pad", False))
        for image in random_images():
            ours = preprocess_image(image, config)
            theirs = processor(image, return_tensors="np")["pixel_values"][0]
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
            assert np.array_equal(ours, theirs), (type(processor).__name__, image.size, image.mode)


def test_checkpoint_processor_config_is_read(llava_llm, reference):
    processor, _ = reference
    images = random_images()[:4]
    ours = llava_llm.vision.pixel_values(images)
    theirs = processor.image_processor(images, return_tensors="np")["pixel_values"]
    assert np.array_equal(ours, theirs)
    assert llava_llm.vision.tokens_per_image == 16


# --------------------------------------------------------------------------- (b) features


def test_vision_tower_and_projector_match_transformers(llava_dir, llava_llm, reference):
    import torch

    from mistralrs_jax.loading.safetensors import SafetensorsWeights
    from mistralrs_jax.models.vision.clip import build_clip_vision_tower, vision_tower_prefix

    _, model = reference
    pixels = llava_llm.vision.pixel_values(random_images()[:3])
    ours = llava_llm.vision.image_features(pixels)  # padded to the 4-image bucket inside
    with torch.inference_mode():
        theirs = model.model.get_image_features(pixel_values=torch.tensor(pixels), vision_feature_layer=-2,
                                                vision_feature_select_strategy="default").pooler_output
    theirs = np.stack([t.numpy() for t in theirs])
    assert ours.shape == theirs.shape == (3, 16, COMMON["hidden_size"])
    assert np.abs(ours - theirs).max() < 1e-4 * max(1.0, np.abs(theirs).max())

    # Every hidden state the tower can be read at (0 = after the pre-LayerNorm ... 3 = the last
    # layer), with the class token: transformers' hidden_states tuple, one by one.
    with torch.inference_mode():
        states = model.model.vision_tower(torch.tensor(pixels), output_hidden_states=True).hidden_states
    with SafetensorsWeights(str(llava_dir)) as source:
        prefix = vision_tower_prefix(source._shard_of, str(llava_dir))
        for index in range(4):
            tower = build_clip_vision_tower(llava_llm.vision.config.vision, source, prefix, (index,),
                                            keep_class_token=True)
            assert len(tower.layers) == index  # layers past the one read are never built
            got = np.asarray(tower(pixels))
            want = states[index].numpy()
            assert got.shape == want.shape == (3, 17, 32)
            assert np.abs(got - want).max() < 1e-4, index


# --------------------------------------------------------------------------- (c) logits


def test_prompt_expansion_and_teacher_forced_logits_match_transformers(llava_llm, reference):
    image = random_images()[3]
    text, inputs = reference_inputs(reference, image)
    ids, our_text, multimodal = llava_llm.chat_prompt(image_chat(image))
    assert our_text == text
    assert ids == inputs["input_ids"][0].tolist()  # one <image> became 16, where the processor put them
    assert multimodal.positions.min() < STEP_TOKENS <= multimodal.positions.max()

    import torch

    with torch.inference_mode():
        want = reference[1](**inputs).logits[0].numpy()
    got = llava_llm.score(ids, images=[image])
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # The image matters: without its features (placeholder embeddings instead) the logits move.
    text_only = llava_llm.score(ids)
    assert np.abs(text_only - want)[multimodal.positions.min():].max() > 0.1


# --------------------------------------------------------------------------- (d) generation


def test_greedy_generation_matches_transformers_concurrently(llava_llm, reference):
    """Two image requests (different images, chunked prefill through the image) and one text-only
    request at once, then more: every one equals transformers' generate; no compile after warm-up."""
    import torch

    from mistralrs_jax import SamplingParams

    images = random_images()
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    compiles_before = llava_llm.metrics()["compiles"]

    wanted = [reference_greedy(reference, reference_inputs(reference, image)[1]) for image in images[:2]]
    text_prompt = "<s>USER: Tell me about the weather. ASSISTANT:"
    text_ids = llava_llm.tokenizer.encode(text_prompt, add_special_tokens=False)
    wanted_text = reference_greedy(reference, {"input_ids": torch.tensor([text_ids]),
                                               "attention_mask": torch.ones(1, len(text_ids), dtype=torch.long)})
    assert wanted[0] != wanted[1]  # the images steer the output

    outputs = llava_llm.chat([image_chat(images[0]), image_chat(images[1])], greedy)
    text_output = llava_llm.generate(text_ids, greedy)
    assert [out.outputs[0].token_ids for out in outputs] == wanted
    assert text_output[0].outputs[0].token_ids == wanted_text

    # All at once through the lower-level API: vLLM-style dict prompts, one with transformers'
    # already-expanded ids, one with a single placeholder in text, plus the text-only prompt.
    _, inputs = reference_inputs(reference, images[0])
    prompts = [{"prompt_token_ids": inputs["input_ids"][0].tolist(), "multi_modal_data": {"image": images[0]}},
               {"prompt": llava_llm.apply_chat_template(reference_chat(images[1])),
                "multi_modal_data": {"image": [images[1]]}},
               text_ids]
    together = llava_llm.generate(prompts, greedy)
    assert [out.outputs[0].token_ids for out in together] == [wanted[0], wanted[1], wanted_text]
    assert llava_llm.metrics()["compiles"] == compiles_before


def test_prefix_cache_never_shares_kv_across_images(llava_llm, reference):
    from mistralrs_jax import SamplingParams

    images = random_images()
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llava_llm.reset_prefix_cache()
    first = llava_llm.chat(image_chat(images[2]), greedy)[0].outputs[0].token_ids
    hits_before = llava_llm.metrics()["prefix_cache_hits"]
    # Same text, another image: the blocks before the image hold the same tokens, but nothing may be shared.
    second = llava_llm.chat(image_chat(images[4]), greedy)[0].outputs[0].token_ids
    assert llava_llm.metrics()["prefix_cache_hits"] == hits_before
    assert second == reference_greedy(reference, reference_inputs(reference, images[4])[1])
    # The first image again: its cached blocks are found and the output is unchanged.
    again = llava_llm.chat(image_chat(images[2]), greedy)[0].outputs[0].token_ids
    assert llava_llm.metrics()["prefix_cache_hits"] > hits_before
    assert again == first == reference_greedy(reference, reference_inputs(reference, images[2])[1])


def test_bad_images_and_placeholders_raise_typed_errors(llava_llm, tmp_path):
    from mistralrs_jax.errors import ImageError

    image = random_images()[0]
    with pytest.raises(ImageError, match="base64"):
        llava_llm.chat(image_chat("data:image/png;base64,@@not-base64@@", part="image_url"))
    with pytest.raises(ImageError, match="not a readable image"):
        llava_llm.chat(image_chat("data:image/png;base64," + base64.b64encode(b"plain text").decode(),
                                  part="image_url"))
    with pytest.raises(ImageError, match="not a file"):
        llava_llm.chat(image_chat(str(tmp_path / "missing.png"), part="image_url"))
    with pytest.raises(ImageError, match="2 image placeholder"):
        llava_llm.generate({"prompt": "<image><image> hi", "multi_modal_data": {"image": image}})
    # A local path and a file:// URL load the same pixels as the image itself.
    path = tmp_path / "picture.png"
    image.save(path)
    ids, _, by_object = llava_llm.chat_prompt(image_chat(image))
    for source in (str(path), f"file://{path}", data_url(image)):
        ids_from, _, loaded = llava_llm.chat_prompt(image_chat(source, part="image_url"))
        assert ids_from == ids and np.array_equal(loaded.embeds, by_object.embeds)
        assert loaded.cache_salt == by_object.cache_salt


def test_text_only_templates_get_image_tokens_before_the_text():
    """A chat template that reads content as a string gets each message's image tokens on their
    own lines before its text (vLLM's rule); a template that drops images is an error."""
    from mistralrs_jax.errors import ImageError
    from mistralrs_jax.loading.chat_template import ChatTemplate
    from mistralrs_jax.models.vision.messages import render_with_images, split_image_parts

    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                             {"type": "image_url", "image_url": {"url": "a.png"}},
                                             {"type": "image_url", "image_url": {"url": "b.png"}}]}]
    parts, images = split_image_parts(messages)
    assert images == ["a.png", "b.png"]
    plain = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert render_with_images(plain.render, parts, 2, "<image>") == "user: <image>\n<image>\nCompare\n"
    drops_images = ChatTemplate("{% for m in messages %}{% for p in m['content'] if p['type'] == 'text' %}"
                                "{{ p['text'] }}{% endfor %}{% endfor %}")
    with pytest.raises(ImageError, match="placed 0 image tokens"):
        render_with_images(drops_images.render, parts, 2, "<image>")


def test_http_image_urls_load_and_fail_with_typed_errors(tmp_path):
    from mistralrs_jax.errors import ImageError
    from mistralrs_jax.models.vision.image_processing import load_image

    image = random_images()[1]
    image.save(tmp_path / "picture.png")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(2)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        loaded = load_image(f"{base}/picture.png")
        assert np.array_equal(np.asarray(loaded), np.asarray(image))
        with pytest.raises(ImageError, match="HTTP 404"):
            load_image(f"{base}/missing.png")
        start = time.monotonic()
        with pytest.raises(ImageError, match="Timeout"):
            load_image(f"{base}/slow.png", timeout=0.3)
        assert time.monotonic() - start < 1.5
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- (e) server


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    """A text-only model (family_fixtures' tiny llama) for the 'no images here' paths."""
    from mistralrs_jax import LLM

    directory = build_checkpoint("llama2", tmp_path_factory.mktemp("text") / "tiny-llama")
    llm = LLM(str(directory), max_seqs=2, token_buckets=[2, 8, 32], max_num_batched_tokens=32, pa_ctxt_len=512)
    try:
        yield llm
    finally:
        llm.shutdown()


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


# --------------------------------------------------------------------------- CLI


def test_vision_plain_arch_flag(text_llm, llava_llm):
    from mistralrs_jax import cli
    from mistralrs_jax.errors import NotSupportedError

    parser = cli.build_parser()
    args = parser.parse_args(["vision-plain", "-m", "some/llava", "-a", "llava"])
    assert cli.build_llm_kwargs(args)["model"] == "some/llava"
    assert cli.build_llm_kwargs(parser.parse_args(["vision-plain", "-m", "x", "-a", "llava_next"]))["model"] == "x"
    for arch in ("phi3v", "idefics3", "no-such-arch"):
        with pytest.raises(NotSupportedError, match=r"supported: idefics2, llava, llava_next\)"):
            cli.build_llm_kwargs(parser.parse_args(["vision-plain", "-m", "x", "-a", arch]))
    cli._check_arch(llava_llm, args)  # a vision model under vision-plain: fine
    with pytest.raises(NotSupportedError, match="text model"):
        cli._check_arch(text_llm, args)


def test_unsupported_vision_checkpoints_name_the_supported_ones(tmp_path):
    from mistralrs_jax.errors import UnsupportedArchitectureError
    from mistralrs_jax.models.vision import vision_architecture

    for architecture in ("Idefics3ForConditionalGeneration", "Phi3VForCausalLM", "LlavaLlamaForCausalLM"):
        directory = tmp_path / architecture
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        with pytest.raises(UnsupportedArchitectureError, match="llava"):
            vision_architecture(str(directory))


# --------------------------------------------------------------------------- LLaVA-NeXT (1.6)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory) -> Path:
    return build_llava_checkpoint(tmp_path_factory.mktemp("llava-next") / "tiny-llava-next", seed=1,
                                  next_version=True)


@pytest.fixture(scope="module")
def next_reference(next_dir):
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(next_dir)
    model = transformers.LlavaNextForConditionalGeneration.from_pretrained(
        next_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return processor, model


@pytest.fixture(scope="module")
def next_llm(next_dir):
    from mistralrs_jax import LLM

    llm = LLM(str(next_dir), max_seqs=4, token_buckets=[2, 8, STEP_TOKENS], max_num_batched_tokens=STEP_TOKENS,
              pa_ctxt_len=1024)
    try:
        yield llm
    finally:
        llm.shutdown()


def test_anyres_geometry_matches_transformers():
    """Best resolution, fitted size and unpadding on 2,000 random image sizes, against transformers' own."""
    import torch
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_processing_utils import select_best_resolution as reference_best
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from mistralrs_jax.models.vision.llava_next import fitted_size, select_best_resolution, unpad

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 2000, (2000, 2)).tolist():
        best = select_best_resolution(height, width, pinpoints)
        assert best == reference_best((height, width), pinpoints)
        dummy = np.zeros((3, height, width), np.uint8)
        assert fitted_size(height, width, *best) == get_patch_output_size(dummy, best, ChannelDimension.FIRST)
        grid = np.arange(2 * (best[0] // 14) * (best[1] // 14), dtype=np.float32).reshape(2, best[0] // 14, -1)
        assert np.array_equal(unpad(grid, height, width), unpad_image(torch.tensor(grid), (height, width)).numpy())


def test_llava_next_pixels_features_and_logits_match_transformers(next_llm, next_reference):
    import torch

    processor, model = next_reference
    vision = next_llm.vision
    images = random_images()
    batch = processor.image_processor(images, return_tensors="np")
    counts = set()
    for index, image in enumerate(images):
        views, size = vision.image_views(image)
        assert tuple(size) == tuple(batch["image_sizes"][index])
        assert np.array_equal(views, batch["pixel_values"][index][:len(views)])  # the rest is batch padding
        assert not batch["pixel_values"][index][len(views):].any()
        counts.add(len(views))
    assert counts == {3, 4, 5}  # 1 x 2, 2 x 1 / 3 x 1 and 2 x 2 tilings all occur

    features, _ = vision.encode_images(images)
    with torch.inference_mode():
        reference = model.model.get_image_features(
            pixel_values=torch.tensor(batch["pixel_values"]), image_sizes=torch.tensor(batch["image_sizes"]),
            vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output
    assert [len(f) for f in features] == [len(r) for r in reference]
    assert len({len(f) for f in features}) > 2  # the token count follows each image's shape
    for ours, theirs in zip(features, reference):
        assert np.abs(ours - theirs.numpy()).max() < 1e-4

    for image in images[:3]:
        text = processor.apply_chat_template(reference_chat(image), add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        ids, our_text, _ = next_llm.chat_prompt(image_chat(image))
        assert (our_text, ids) == (text, inputs["input_ids"][0].tolist())
        with torch.inference_mode():
            want = model(**inputs).logits[0].numpy()
        got = next_llm.score(ids, images=[image])
        assert np.abs(got - want).max() < 1e-3 and (got.argmax(-1) == want.argmax(-1)).all()


def test_llava_next_greedy_generation_matches_transformers(next_llm, next_reference):
    from mistralrs_jax import SamplingParams

    processor, _ = next_reference
    images = random_images()[:3]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    compiles_before = next_llm.metrics()["compiles"]
    wanted = []
    for image in images:
        text = processor.apply_chat_template(reference_chat(image), add_generation_prompt=True)
        wanted.append(reference_greedy(next_reference, processor(images=image, text=text, return_tensors="pt")))
    outputs = next_llm.chat([image_chat(image) for image in images], greedy)
    assert [out.outputs[0].token_ids for out in outputs] == wanted
    assert next_llm.metrics()["compiles"] == compiles_before


def test_a_draft_model_with_a_vision_model_is_refused(llava_dir):
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import NotSupportedError

    with pytest.raises(NotSupportedError, match="speculative decoding .* not supported for vision models"):
        LLM(str(llava_dir), draft_model=str(llava_dir), warmup=False)
