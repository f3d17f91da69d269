"""LLaVA-NeXT (1.6) against transformers: anyres tiling geometry, pixels, features, logits and
greedy generation (a tiny random checkpoint built by transformers, see vision_fixtures.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vision_fixtures import NEW_TOKENS, STEP_TOKENS, build_llava_checkpoint, image_chat, random_images, reference_chat, \
    reference_greedy

# logits against transformers in f32: measured 4.8e-6 - 1.6e-5 (12x headroom; an eps or RoPE error moves them > 0.4)
VISION_LOGITS_BOUND = 2e-4


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
        assert np.abs(got - want).max() < VISION_LOGITS_BOUND and (got.argmax(-1) == want.argmax(-1)).all()


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
