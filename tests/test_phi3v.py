"""Phi-3 Vision (`vision-plain -a phi3v`) against what transformers and the published processor give.

transformers has no Phi-3 Vision class, so each part is checked against what it does have
(phi3v_fixtures.py): the CLIP tower against `CLIPVisionModel`, the text model against
`Phi3ForCausalLM`, the HD transform's crop grid and token counts against the processor's
documented formulas, the pixels against the processor's steps in PIL / torch, the feature
layout against the published reshape code, and the whole model (logits, greedy tokens through
the server with the openai client) against that pipeline composed in torch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from phi3v_fixtures import CROP, IMAGE_TOKEN_ID, MERGED, NUM_CROPS, Phi3VReference, build_phi3v_checkpoint, hd_layout, \
    reference_hd_size, reference_token_count
from vision_fixtures import data_url, random_images

# logits against transformers in f32: measured 4.8e-6 - 1.6e-5 (12x headroom; an eps or RoPE error moves them > 0.4)
VISION_LOGITS_BOUND = 2e-4

QUESTION = "What is in this picture?"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def phi3v_dir(tmp_path_factory) -> Path:
    return build_phi3v_checkpoint(tmp_path_factory.mktemp("phi3v") / "tiny-phi3v")


@pytest.fixture(scope="module")
def reference(phi3v_dir) -> Phi3VReference:
    return Phi3VReference(phi3v_dir)


@pytest.fixture(scope="module")
def phi3v_llm(phi3v_dir):
    from mistralrs_jax import LLM

    llm = LLM(str(phi3v_dir), max_seqs=4, token_buckets=[2, 8, 32], max_num_batched_tokens=32, pa_ctxt_len=512)
    try:
        yield llm
    finally:
        llm.shutdown()


def _images():
    """The shared test images (40x90 ... 13x7, RGBA, L, P) plus a tall and a wide one: 1x2 up to 4x1 crop grids."""
    from PIL import Image

    rng = np.random.default_rng(3)
    return random_images() + [Image.fromarray(rng.integers(0, 256, (300, 40, 3), dtype=np.uint8)),
                              Image.fromarray(rng.integers(0, 256, (30, 260, 3), dtype=np.uint8))]


def _chat(image, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": question}]}]


def _reference_ids(reference, text: str, images) -> list[int]:
    """The processor's ids for our prompt text, its `<|image_N|>` tags where we hold `<|image|>`,
    negative placeholder ids mapped to the image token id."""
    for number in range(1, len(images) + 1):
        text = text.replace("<|image|>", f"<|image_{number}|>", 1)
    return [IMAGE_TOKEN_ID if t < 0 else t for t in reference.prompt_ids(text, images)]


# --------------------------------------------------------------------------- geometry


def test_hd_geometry_matches_the_processor_formulas():
    """Crop grid and token count of 3,000 image sizes for num_crops 1, 4 and 16 at 336 px (the
    published setting), against calc_hd_transform_size / calc_num_image_tokens_from_image_size."""
    from mistralrs_jax.models.vision.phi3v_processing import Phi3VImageProcessor, num_image_tokens

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 3000, (1000, 2)).tolist() + [[336, 336], [337, 336], [672, 1344], [8000, 50], [50, 8000]]
    for num_crops in (1, 4, 16):
        processor = Phi3VImageProcessor(num_crops=num_crops)
        for width, height in sizes:
            if min(processor.resized_size(width, height)) < 1:
                continue  # too thin to resize (refused with an ImageError; the processor would fail too)
            assert processor.hd_size(width, height) == reference_hd_size(width, height, num_crops), (width, height)
            rows, cols = processor.crop_grid(width, height)
            assert rows * cols <= num_crops
            assert num_image_tokens(rows, cols, 12) == reference_token_count(width, height, num_crops)
    assert num_image_tokens(1, 1, 12) == 2 * 144 + 1 + 2 * 12  # 313: one crop plus the global view
    assert Phi3VImageProcessor(num_crops=16).crop_grid(1344, 1344) == (4, 4)


def test_global_view_resize_matches_torch_bicubic():
    """The global view's bicubic resize against torch's `interpolate(mode="bicubic")` on noise, from
    HD canvases of the published 336-px crops and from odd sizes, down and up."""
    import torch

    from mistralrs_jax.models.vision.phi3v_processing import bicubic_resize

    rng = np.random.default_rng(2)
    cases = [((672, 1344), (336, 336)), ((1344, 336), (336, 336)), ((1008, 1008), (336, 336)),
             ((336, 336), (336, 336)), ((97, 311), (40, 123)), ((50, 60), (77, 90))]
    for (height, width), size in cases:
        values = rng.standard_normal((3, height, width)).astype(np.float32)
        want = torch.nn.functional.interpolate(torch.from_numpy(values)[None], size=size, mode="bicubic")[0].numpy()
        got = bicubic_resize(values, *size)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, (height, width, size)


@pytest.mark.parametrize("order", ["sub_glb", "glb_sub"])
def test_hd_layout_matches_the_published_reshape(order):
    """Our merge + row gather against the published reshape / newline / separator code on
    labelled features, for crop grids from 1x1 to 4x4, in both hd_transform_orders."""
    import torch

    from mistralrs_jax.models.vision.phi3v import hd_row_order, merge_2x2

    side, channels = 2 * MERGED, 3
    for rows, cols in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 1), (1, 4), (4, 4)]:
        views = 1 + rows * cols
        states = torch.arange(views * side * side * channels, dtype=torch.float64).reshape(views, side * side,
                                                                                          channels)
        sub_gn, glb_gn = -torch.ones(1, 1, 1, 4 * channels), -2 * torch.ones(1, 1, 4 * channels)
        want = hd_layout(states, rows, cols, sub_gn, glb_gn, order).numpy()
        merged = merge_2x2(states.numpy(), side).reshape(-1, 4 * channels)
        table = np.concatenate([merged, sub_gn.reshape(1, -1).numpy(), glb_gn.reshape(1, -1).numpy()])
        got = table[hd_row_order(rows, cols, MERGED, order)]
        assert got.shape == want.shape and np.array_equal(got, want), (rows, cols)
        assert len(got) == (rows * cols + 1) * MERGED ** 2 + 1 + (rows + 1) * MERGED


# --------------------------------------------------------------------------- the parts


def test_clip_tower_matches_transformers(phi3v_llm, reference):
    import torch

    pixels = np.random.default_rng(1).standard_normal((3, 3, CROP, CROP)).astype(np.float32)
    with torch.inference_mode():
        want = reference.clip(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2][:, 1:].numpy()
    got = np.asarray(phi3v_llm.vision.view_model.img_processor(pixels))
    assert got.shape == want.shape == (3, (2 * MERGED) ** 2, 32)
    assert np.abs(got - want).max() < 1e-4


def test_text_model_matches_phi3(phi3v_llm, reference):
    import torch

    ids = phi3v_llm.tokenizer.encode("The quick brown fox jumps over the lazy dog, then rests.")
    got = phi3v_llm.score(ids)
    with torch.inference_mode():
        want = reference.text(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < VISION_LOGITS_BOUND and (got.argmax(-1) == want.argmax(-1)).all()


def test_pixels_features_ids_and_logits_match_the_reference(phi3v_llm, reference):
    vision = phi3v_llm.vision
    images = _images()
    grids = set()
    for image in images:
        views, (rows, cols) = vision.image_views(image)
        want_views, (height, width) = reference.views(image)
        assert (rows * CROP, cols * CROP) == (height, width)
        assert views.shape == want_views.shape and np.abs(views - want_views).max() < 1e-5
        grids.add((rows, cols))
    assert {(1, 2), (2, 1), (2, 2), (4, 1), (1, 4)} <= grids, grids

    features, _ = vision.encode_images(images)
    for image, ours in zip(images, features):
        theirs = reference.image_features(image)
        assert ours.shape == theirs.shape
        assert len(ours) == vision.tokens_for(image) == reference_token_count(image.width, image.height, NUM_CROPS,
                                                                              CROP, MERGED)
        assert np.abs(ours - theirs).max() < 1e-4

    for image in (images[0], images[8]):
        ids, text, _ = phi3v_llm.chat_prompt(_chat(image))
        assert text.count("<|image|>") == 1
        assert ids == _reference_ids(reference, text, [image])
        unexpanded = phi3v_llm.tokenizer.encode_prompt(text)
        got = phi3v_llm.score(unexpanded, images=[image])
        want = reference.logits(reference.prompt_ids(text.replace("<|image|>", "<|image_1|>"), [image]), [image])
        assert np.abs(got - want).max() < VISION_LOGITS_BOUND and (got.argmax(-1) == want.argmax(-1)).all()


def test_two_images_in_one_prompt(phi3v_llm, reference):
    images = _images()[:2]
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    ids, text, multimodal = phi3v_llm.chat_prompt([{"role": "user", "content": [*parts, {"type": "text",
                                                                                         "text": QUESTION}]}])
    assert multimodal.num_images == 2 and text.count("<|image|>") == 2
    assert ids == _reference_ids(reference, text, images)
    tagged = text.replace("<|image|>", "<|image_1|>", 1).replace("<|image|>", "<|image_2|>", 1)
    want = reference.logits(reference.prompt_ids(tagged, images), images)
    got = phi3v_llm.score(phi3v_llm.tokenizer.encode_prompt(text), images=images)
    assert np.abs(got - want).max() < VISION_LOGITS_BOUND


def test_batched_greedy_generation_matches_the_reference(phi3v_llm, reference):
    """Three image chats in one batch (their image rows split across prefill chunks): each one's
    greedy tokens are the reference's, and nothing compiles after warm-up."""
    from mistralrs_jax import SamplingParams

    images = [_images()[i] for i in (0, 5, 9)]
    compiles = phi3v_llm.metrics()["compiles"]
    wanted = []
    for image in images:
        _, text, _ = phi3v_llm.chat_prompt(_chat(image))
        tagged = text.replace("<|image|>", "<|image_1|>")
        wanted.append(reference.greedy(reference.prompt_ids(tagged, [image]), [image], NEW_TOKENS))
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = phi3v_llm.chat([_chat(image) for image in images], greedy)
    assert [out.outputs[0].token_ids for out in outputs] == wanted
    _, text, _ = phi3v_llm.chat_prompt(_chat(images[0]))  # a raw prompt holds <|image|> where the image goes
    raw = phi3v_llm.generate({"prompt": text, "multi_modal_data": {"image": images[0]}}, greedy)
    assert raw[0].outputs[0].token_ids == wanted[0]
    assert phi3v_llm.metrics()["compiles"] == compiles


def test_bf16_weights_stay_close_to_the_f32_reference(phi3v_dir, reference):
    """--dtype bf16 (what a GPU serves the published bf16 checkpoints in): features and logits within
    bf16 rounding of the f32 reference, the same greedy choices."""
    from mistralrs_jax import LLM

    llm = LLM(str(phi3v_dir), dtype="bf16", max_seqs=2, token_buckets=[8, 32], max_num_batched_tokens=32,
              pa_ctxt_len=256, warmup=False)
    try:
        image = _images()[0]
        features, _ = llm.vision.encode_images([image])
        want = reference.image_features(image)
        assert np.abs(features[0] - want).max() < 0.02 * np.abs(want).max()
        _, text, _ = llm.chat_prompt(_chat(image))
        got = llm.score(llm.tokenizer.encode_prompt(text), images=[image])
        logits = reference.logits(reference.prompt_ids(text.replace("<|image|>", "<|image_1|>"), [image]), [image])
        assert np.abs(got - logits).max() < 0.2 and (got.argmax(-1) == logits.argmax(-1)).mean() > 0.95
    finally:
        llm.shutdown()


def test_glb_sub_order_checkpoint_matches_the_reference(tmp_path):
    """hd_transform_order "glb_sub" (the published code's other order): the global view's rows first."""
    from mistralrs_jax import LLM

    directory = build_phi3v_checkpoint(tmp_path / "glb-sub", seed=4, hd_order="glb_sub")
    llm = LLM(str(directory), max_seqs=2, token_buckets=[8, 32], max_num_batched_tokens=32, pa_ctxt_len=256,
              warmup=False)
    try:
        assert llm.vision.config.hd_transform_order == "glb_sub"
        images = _images()[:2]
        features, _ = llm.vision.encode_images(images)
        reference = Phi3VReference(directory)
        for image, ours in zip(images, features):
            assert np.abs(ours - reference.image_features(image)).max() < 1e-4
    finally:
        llm.shutdown()


def test_prompt_ids_with_a_phi3_style_tokenizer(phi3v_dir, tmp_path):
    """Phi-3's tokenizer.json (the legacy Llama conversion: a Prepend("▁") + Replace normalizer, no
    pre-tokenizer, added tokens that rstrip): the expanded prompt is still the processor's ids."""
    from tokenizers import Tokenizer, normalizers

    from mistralrs_jax import LLM

    directory = tmp_path / "phi3-style-tokenizer"
    shutil.copytree(phi3v_dir, directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.pre_tokenizer = None
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.save(str(directory / "tokenizer.json"))
    llm = LLM(str(directory), max_seqs=2, token_buckets=[8, 32], max_num_batched_tokens=32, pa_ctxt_len=256,
              warmup=False)
    try:
        reference = Phi3VReference(directory)
        images = _images()[:2]
        parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        for content in ([parts[0], {"type": "text", "text": QUESTION}],
                        [*parts, {"type": "text", "text": "Compare <|image_1|> with <|image_2|> please."}]):
            ids, text, multimodal = llm.chat_prompt([{"role": "user", "content": content}])
            assert ids == _reference_ids(reference, text, images[:multimodal.num_images])
    finally:
        llm.shutdown()


def test_numbered_image_tags_place_the_images(phi3v_llm, reference):
    """`<|image_N|>` written in the text (the processor's and mistral.rs' Phi-3 Vision prompts) places
    the images instead of the image parts; the ids are the processor's for that text."""
    from mistralrs_jax.errors import ImageError

    images = _images()[:2]
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    tagged = "First <|image_1|> then <|image_2|>: " + QUESTION
    ids, text, multimodal = phi3v_llm.chat_prompt([{"role": "user", "content": [*parts, {"type": "text",
                                                                                         "text": tagged}]}])
    assert multimodal.num_images == 2 and "<|image_" not in text and text.count("<|image|>") == 2
    assert ids == _reference_ids(reference, text, images)
    assert text.index("First") < text.index("<|image|>")  # where the tags are, not before the text
    for wrong in ("<|image_2|> <|image_1|>", "<|image_1|> <|image_1|>", "<|image_1|> <|image_3|>"):
        with pytest.raises(ImageError, match="number the images"):
            phi3v_llm.chat_prompt([{"role": "user", "content": [*parts, {"type": "text", "text": wrong}]}])
    raw = phi3v_llm.tokenizer.encode("<|user|>\n<|image_1|>\nhi<|end|>\n<|assistant|>\n")
    with pytest.raises(ImageError, match=r"a raw prompt takes <\|image\|>"):
        phi3v_llm.vision.prepare(raw, images[:1])


# --------------------------------------------------------------------------- the server


def _serve(llm):
    from server.app import create_app
    from server.serving import BackgroundServer

    return BackgroundServer(create_app(llm)).start()


def test_server_answers_image_chats_like_the_reference(phi3v_llm, reference):
    import openai

    image = _images()[1]
    ids, text, _ = phi3v_llm.chat_prompt(_chat(image))
    want = reference.greedy(reference.prompt_ids(text.replace("<|image|>", "<|image_1|>"), [image]), [image],
                            NEW_TOKENS)
    background = _serve(phi3v_llm)
    try:
        client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=120)
        kwargs = dict(model=phi3v_llm.model_name, temperature=0, max_tokens=NEW_TOKENS,
                      extra_body={"ignore_eos": True})
        reply = client.chat.completions.create(messages=_chat(image), **kwargs)
        assert reply.choices[0].message.content == phi3v_llm.tokenizer.decode(want)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == NEW_TOKENS
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], **kwargs)
        assert caught.value.body["code"] == "invalid_image"
    finally:
        background.stop()


# --------------------------------------------------------------------------- bad input


def test_image_too_big_for_the_context_is_refused_before_any_compute(phi3v_dir, monkeypatch):
    """An image whose crops need more tokens than the context holds: a 400 (context_length_exceeded)
    from the server, before the image is resized or the tower runs; a smaller one still passes."""
    import openai
    from PIL import Image

    from mistralrs_jax import LLM
    from mistralrs_jax.errors import ImageError, PromptTooLongError

    llm = LLM(str(phi3v_dir), max_seqs=2, token_buckets=[8, 32], max_num_batched_tokens=32, max_model_len=80,
              pa_ctxt_len=128, warmup=False)
    try:
        vision = llm.vision
        calls = []
        for name in ("image_views", "encode_images"):
            original = getattr(vision, name)
            monkeypatch.setattr(vision, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
        big = Image.fromarray(np.zeros((300, 300, 3), np.uint8))  # 2 x 2 crops: 93 image tokens
        assert vision.tokens_for(big) > llm.max_model_len
        with pytest.raises(PromptTooLongError):
            llm.chat_prompt(_chat(big, "cat"))
        background = _serve(llm)
        try:
            client = openai.OpenAI(base_url=f"{background.url}/v1", api_key="unused", max_retries=0, timeout=120)
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=llm.model_name, messages=_chat(big, "cat"), max_tokens=2)
            assert caught.value.status_code == 400
            assert caught.value.body["code"] == "context_length_exceeded"
        finally:
            background.stop()
        thin = Image.fromarray(np.zeros((2, 4000, 3), np.uint8))  # its short edge would resize to nothing
        with pytest.raises(ImageError, match="too thin"):
            llm.chat_prompt(_chat(thin, "cat"))
        assert calls == []
        small = Image.fromarray(np.zeros((50, 100, 3), np.uint8))  # 1 x 2 crops: 57 image tokens
        ids, _, _ = llm.chat_prompt(_chat(small, "cat"))
        assert len(ids) <= llm.max_model_len
        assert calls == ["encode_images", "image_views"]
    finally:
        llm.shutdown()


def test_vision_plain_arch_phi3v(phi3v_llm, phi3v_dir, caplog):
    """`vision-plain -m DIR -a phi3v` selects the model, and the flag agrees with the loaded files."""
    from mistralrs_jax import cli

    args = cli.build_parser().parse_args(["vision-plain", "-m", str(phi3v_dir), "-a", "phi3v"])
    assert cli.build_llm_kwargs(args)["model"] == str(phi3v_dir)
    with caplog.at_level("WARNING"):
        cli._check_arch(phi3v_llm, args)
    assert phi3v_llm.vision.arch == "phi3v" and "--arch" not in caplog.text


def test_prompt_image_tokens_must_match_the_images(phi3v_llm):
    from mistralrs_jax.errors import ImageError

    image = _images()[2]
    ids = phi3v_llm.tokenizer.encode("<|user|>\nno image here<|end|>\n<|assistant|>\n")
    with pytest.raises(ImageError, match=r"<\|image\|>"):
        phi3v_llm.vision.prepare(ids, [image])
    with pytest.raises(ImageError, match="1 image"):
        phi3v_llm.vision.prepare(ids + [IMAGE_TOKEN_ID, IMAGE_TOKEN_ID], [image])


def test_published_configs_parse(tmp_path):
    """Phi-3-vision-128k-instruct's and Phi-3.5-vision-instruct's config keys (no tower config:
    CLIP ViT-L/14-336; LongRoPE as "su" / "longrope"; num_crops 16 / 4) give the model they describe."""
    from mistralrs_jax.models.vision import vision_architecture
    from mistralrs_jax.models.vision.phi3v import Phi3VConfig
    from mistralrs_jax.models.vision.phi3v_processing import Phi3VImageProcessor, num_image_tokens

    for name, rope_type, num_crops in (("Phi-3-vision-128k-instruct", "su", 16),
                                       ("Phi-3.5-vision-instruct", "longrope", 4)):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({
            "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "torch_dtype": "bfloat16",
            "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "sliding_window": 131072, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "rope_scaling": {"type": rope_type, "long_factor": [1.5] * 48,
                                                           "short_factor": [1.0] * 48},
            "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True},
            "img_processor": {"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                              "name": "clip_vision_model", "num_img_tokens": 144}}))
        (directory / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Phi3VImageProcessor", "num_crops": num_crops, "num_img_tokens": 144}))
        assert vision_architecture(str(directory)) == "phi3v"
        config = Phi3VConfig.from_model_dir(str(directory))
        assert (config.text.arch, config.text.hidden_size, config.text.num_layers) == ("phi3", 3072, 32)
        assert config.text.rope_scaling["rope_type"] == rope_type
        assert (config.vision.image_size, config.vision.patch_size, config.vision.hidden_size) == (336, 14, 1024)
        assert (config.merged_grid, config.num_img_tokens, config.feature_layers) == (12, 144, (23,))
        processor = Phi3VImageProcessor.from_model_dir(str(directory), crop_size=config.vision.image_size)
        rows, cols = processor.crop_grid(1000, 666)  # mistral.rs' Phi-3 Vision example picture
        assert num_image_tokens(rows, cols, 12) == reference_token_count(1000, 666, num_crops)
        assert rows * cols <= num_crops


def test_unsupported_phi3v_configs_are_refused_by_name(phi3v_dir, tmp_path):
    from mistralrs_jax.errors import ModelLoadError, NotSupportedError
    from mistralrs_jax.models.vision import check_vision_arch
    from mistralrs_jax.models.vision.phi3v import Phi3VConfig

    assert check_vision_arch("phi3v") == "phi3v"
    config = Phi3VConfig.from_model_dir(str(phi3v_dir))
    assert (config.text.arch, config.hd_transform_order, config.merged_grid) == ("phi3", "sub_glb", MERGED)
    for change, error, field in [({"embd_layer": {"use_hd_transform": True, "with_learnable_separator": True,
                                                  "projection_cls": "linear"}}, NotSupportedError, "projection_cls"),
                                 ({"embd_layer": {"use_hd_transform": False}}, NotSupportedError, "use_hd_transform"),
                                 ({"img_processor": {"name": "siglip"}}, NotSupportedError, "img_processor"),
                                 ({"img_processor": {"num_img_tokens": 144, "image_dim_out": 32}}, ModelLoadError,
                                  "num_img_tokens")]:
        broken = tmp_path / field
        shutil.copytree(phi3v_dir, broken)
        raw = json.loads((broken / "config.json").read_text())
        raw.update(change)
        (broken / "config.json").write_text(json.dumps(raw))
        with pytest.raises(error, match=field):
            Phi3VConfig.from_model_dir(str(broken))
