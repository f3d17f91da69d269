"""LLaVA 1.5 against transformers: preprocessing, vision features, logits, greedy generation, the CLI.

The checkpoint and the reference (transformers' processor and model) come from vision_fixtures.py;
the server side is in test_vision_server.py, LLaVA-NeXT in test_llava_next.py.
"""
from __future__ import annotations

import base64
import http.server
import json
import threading
import time

import numpy as np
import pytest

from family_fixtures import COMMON
from vision_fixtures import (IMAGE_SIZE, NEW_TOKENS, STEP_TOKENS, data_url, image_chat, random_images, reference_chat,
                             reference_greedy, reference_inputs)

# logits against transformers in f32: measured 4.8e-6 - 1.6e-5 (12x headroom; an eps or RoPE error moves them > 0.4)
VISION_LOGITS_BOUND = 2e-4

pytest_plugins = ["vision_fixtures"]


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
    assert np.abs(got - want).max() < VISION_LOGITS_BOUND
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


# --------------------------------------------------------------------------- CLI


def test_vision_plain_arch_flag(text_llm, llava_llm):
    from mistralrs_jax import cli
    from mistralrs_jax.errors import NotSupportedError

    parser = cli.build_parser()
    args = parser.parse_args(["vision-plain", "-m", "some/llava", "-a", "llava"])
    assert cli.build_llm_kwargs(args)["model"] == "some/llava"
    assert cli.build_llm_kwargs(parser.parse_args(["vision-plain", "-m", "x", "-a", "llava_next"]))["model"] == "x"
    for arch in ("idefics3", "no-such-arch"):
        with pytest.raises(NotSupportedError, match=r"supported: idefics2, llava, llava_next, phi3v\)"):
            cli.build_llm_kwargs(parser.parse_args(["vision-plain", "-m", "x", "-a", arch]))
    cli._check_arch(llava_llm, args)  # a vision model under vision-plain: fine
    with pytest.raises(NotSupportedError, match="text model"):
        cli._check_arch(text_llm, args)


def test_unsupported_vision_checkpoints_name_the_supported_ones(tmp_path):
    from mistralrs_jax.errors import UnsupportedArchitectureError
    from mistralrs_jax.models.vision import vision_architecture

    for architecture in ("Idefics3ForConditionalGeneration", "LlavaLlamaForCausalLM"):
        directory = tmp_path / architecture
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        with pytest.raises(UnsupportedArchitectureError, match="llava"):
            vision_architecture(str(directory))


def test_a_draft_model_with_a_vision_model_is_refused(llava_dir):
    from mistralrs_jax import LLM
    from mistralrs_jax.errors import NotSupportedError

    with pytest.raises(NotSupportedError, match="speculative decoding .* not supported for vision models"):
        LLM(str(llava_dir), draft_model=str(llava_dir), warmup=False)
