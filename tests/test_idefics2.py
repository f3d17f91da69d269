"""Idefics2 against transformers: preprocessing, prompt expansion, connector output, logits, greedy generation.

The checkpoint is a tiny random `Idefics2ForConditionalGeneration` built by transformers itself
(a 2-layer SigLIP encoder over a 4 x 4 grid of 14-px patches, a 2-layer perceiver of 8 latents,
the 2-layer Mistral of family_fixtures), saved with `save_pretrained` next to an
`Idefics2Processor` (its PIL image processor with edges between 28 and 56 px, so images keep
their aspect ratio and make 2 x 4 ... 4 x 4 patches; the family_fixtures tokenizer plus the
Idefics2 special tokens; an Idefics2-style chat template that glues the question to the image,
exercising the processor's space after the closing fake token). Every reference value comes
from transformers: the image processor's pixel_values, the processor's input_ids,
`get_image_features`, the model's logits and `generate`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from family_fixtures import COMMON, UNK_ID, write_tokenizer
from vision_fixtures import data_url, random_images, randomize

# logits against transformers in f32: measured 4.8e-6 - 1.6e-5 (12x headroom; an eps or RoPE error moves them > 0.4)
VISION_LOGITS_BOUND = 2e-4

FAKE_ID, IMAGE_ID, END_ID = 128, 129, 130  # added after the 128-piece family_fixtures vocabulary
TEXT_VOCAB = 136
N_LATENTS = 8
STEP_TOKENS = 32
NEW_TOKENS = 12
SIZE = {"shortest_edge": 28, "longest_edge": 56}
# An Idefics2-style template (User:<image>question<end_of_utterance>), written for these tests.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
QUESTION = "what is in this picture?"  # "what" after a space tokenizes differently


def build_idefics2_checkpoint(directory: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    write_tokenizer(directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # As Mistral's tokenizer: "▁" only at the start of the text, so a word glued to a special
    # token tokenizes differently from one after a space (the processor's inserted space matters).
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    tokenizer.add_special_tokens(["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    assert [tokenizer.token_to_id(t) for t in ("<fake_token_around_image>", "<image>", "<end_of_utterance>")] == \
        [FAKE_ID, IMAGE_ID, END_ID]
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))

    torch.manual_seed(seed)
    model = transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14),
        perceiver_config=dict(hidden_size=COMMON["hidden_size"], resampler_n_latents=N_LATENTS, resampler_depth=2,
                              resampler_n_heads=4, resampler_head_dim=16, num_key_value_heads=2),
        text_config=transformers.MistralConfig(**dict(COMMON, vocab_size=TEXT_VOCAB, sliding_window=None)),
        image_token_id=IMAGE_ID))
    randomize(model, seed)
    with torch.no_grad():  # the latents start at 1 in transformers: draw them like the other weights
        model.model.connector.perceiver_resampler.latents.normal_(generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(directory)
    processor = transformers.Idefics2Processor(
        image_processor=Idefics2ImageProcessorPil(size=SIZE),
        tokenizer=transformers.AutoTokenizer.from_pretrained(directory), image_seq_len=N_LATENTS,
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(directory)
    return directory


def image_chat(image, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": question}]}]


def reference_chat(question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def idefics2_dir(tmp_path_factory) -> Path:
    return build_idefics2_checkpoint(tmp_path_factory.mktemp("idefics2") / "tiny-idefics2")


@pytest.fixture(scope="module")
def reference(idefics2_dir):
    import torch
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(idefics2_dir)
    model = transformers.Idefics2ForConditionalGeneration.from_pretrained(
        idefics2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return processor, model


@pytest.fixture(scope="module")
def idefics2_llm(idefics2_dir):
    from mistralrs_jax import LLM

    llm = LLM(str(idefics2_dir), max_seqs=4, token_buckets=[2, 8, STEP_TOKENS], max_num_batched_tokens=STEP_TOKENS,
              pa_ctxt_len=512)
    try:
        yield llm
    finally:
        llm.shutdown()


def reference_inputs(reference, images, question: str = QUESTION):
    processor, _ = reference
    text = processor.apply_chat_template(reference_chat(question) if not isinstance(images, list) else
                                         [{"role": "user", "content": [{"type": "image"}] * len(images) +
                                           [{"type": "text", "text": question}]}], add_generation_prompt=True)
    return text, processor(images=images, text=text, return_tensors="pt")


def test_pixels_and_prompt_match_the_processor(idefics2_llm, reference):
    """Aspect-ratio resizing (longest edge down, both edges up to the shortest), rescale and
    normalize: bit-identical to Idefics2ImageProcessorPil; the prompt ids equal the processor's."""
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from mistralrs_jax.models.vision.idefics2 import Idefics2ImageProcessor

    processor, _ = reference
    assert type(processor.image_processor).__name__.startswith("Idefics2ImageProcessor")
    splitting = Idefics2ImageProcessorPil(size={"shortest_edge": 20, "longest_edge": 70}, do_image_splitting=True)
    for theirs_processor in (processor.image_processor, splitting):
        ours_processor = Idefics2ImageProcessor.from_dict(theirs_processor.to_dict())
        for image in random_images():
            crops = ours_processor.crops(image)
            theirs = theirs_processor(image, return_tensors="np")["pixel_values"][0]
            assert len(crops) == len(theirs) == (5 if ours_processor.do_image_splitting else 1)
            for ours, want in zip(crops, theirs):  # transformers pads the crops of one call to a common size
                assert ours.dtype == want.dtype == np.float32
                assert np.array_equal(ours, want[:, :ours.shape[1], :ours.shape[2]]), image.size
                assert not want[:, ours.shape[1]:].any() and not want[:, :, ours.shape[2]:].any()

    image = random_images()[0]
    text, inputs = reference_inputs(reference, image)
    ids, our_text, multimodal = idefics2_llm.chat_prompt(image_chat(data_url(image)))
    assert our_text == text and "<image>what" in text  # the processor inserts a space here
    assert ids == inputs["input_ids"][0].tolist()
    assert ids.count(IMAGE_ID) == N_LATENTS and ids.count(FAKE_ID) == 2
    assert multimodal.embeds.shape == (N_LATENTS, COMMON["hidden_size"])
    # Two adjacent images share one fake token between them, as the processor writes it.
    images = random_images()[:2]
    text, inputs = reference_inputs(reference, images)
    ids = idefics2_llm.vision.expand_placeholders(idefics2_llm.tokenizer.encode_prompt(text), 2)
    assert ids == inputs["input_ids"][0].tolist() and ids.count(FAKE_ID) == 3


def test_connector_output_matches_transformers(idefics2_llm, reference):
    """One image at a time, and several of different sizes in one padded transformers batch
    (its pixel and patch masks): every image's perceiver rows match."""
    import torch

    processor, model = reference
    images = random_images()[:5]
    ours = idefics2_llm.vision.image_features(idefics2_llm.vision.pixel_values(images))
    assert ours.shape == (5, N_LATENTS, COMMON["hidden_size"])
    batch = processor.image_processor(images, return_tensors="pt")  # a list: one sample of five images
    with torch.inference_mode():
        together = model.model.get_image_features(pixel_values=batch["pixel_values"],
                                                  pixel_attention_mask=batch["pixel_attention_mask"]).pooler_output
        one_by_one = [model.model.get_image_features(pixel_values=torch.tensor(p)[None, None]).pooler_output[0]
                      for p in idefics2_llm.vision.pixel_values(images)]
    together = together[0].reshape(5, N_LATENTS, -1).numpy()
    scale = max(1.0, np.abs(together).max())
    assert np.abs(ours - together).max() < 1e-4 * scale
    assert np.abs(ours - np.stack([o.numpy() for o in one_by_one])).max() < 1e-4 * scale
    assert np.abs(ours[0] - ours[1]).max() > 0.1  # the images differ, so do their rows


def test_teacher_forced_logits_match_transformers(idefics2_llm, reference):
    import torch

    image = random_images()[3]
    _, inputs = reference_inputs(reference, image)
    ids = inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        want = reference[1](**inputs).logits[0].numpy()
    got = idefics2_llm.score(ids, images=[image])  # an already-expanded prompt is taken as is
    assert got.shape == want.shape
    assert np.abs(got - want).max() < VISION_LOGITS_BOUND
    assert (got.argmax(-1) == want.argmax(-1)).all()
    first = ids.index(IMAGE_ID)
    assert np.abs(idefics2_llm.score(ids) - want)[first:].max() > 0.1  # without the image the logits move


def test_greedy_generation_and_chat_with_image_urls_match_transformers(idefics2_llm, reference):
    import torch

    from mistralrs_jax import SamplingParams

    _, model = reference
    images = random_images()
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def wanted(image):
        _, inputs = reference_inputs(reference, image)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=UNK_ID)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    # (Not the RGBA image: Idefics2Processor.__call__ drops its alpha with PIL's convert("RGB"),
    # while its own image processor, like ours, composites it onto white.)
    expected = [wanted(images[1]), wanted(images[6])]
    assert expected[0] != expected[1]  # the images steer the output
    outputs = idefics2_llm.chat([image_chat(data_url(images[1])), image_chat(data_url(images[6]))], greedy)
    assert [out.outputs[0].token_ids for out in outputs] == expected


def test_vision_plain_accepts_idefics2(idefics2_llm):
    from mistralrs_jax import cli

    args = cli.build_parser().parse_args(["vision-plain", "-m", "x", "-a", "idefics2"])
    assert cli.build_llm_kwargs(args)["model"] == "x"
    cli._check_arch(idefics2_llm, args)
    assert idefics2_llm.vision.arch == "idefics2"


def test_image_splitting_logits_match_transformers(idefics2_llm, reference):
    """With do_image_splitting each image is its four quarters and itself: five runs of image
    tokens, five perceiver outputs, logits as transformers'."""
    import torch

    processor, model = reference
    vision = idefics2_llm.vision
    image = random_images()[2]
    text = processor.apply_chat_template(reference_chat(), add_generation_prompt=True)
    processor.image_processor.do_image_splitting = True  # the processor's text side reads the attribute
    try:
        inputs = processor(images=image, text=text, return_tensors="pt")
    finally:
        processor.image_processor.do_image_splitting = False
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(IMAGE_ID) == 5 * N_LATENTS
    vision.processor.do_image_splitting, vision.crops_per_image = True, 5
    try:
        ours_ids = vision.expand_placeholders(idefics2_llm.tokenizer.encode_prompt(text), 1)
        got = idefics2_llm.score(ours_ids, images=[image])
    finally:
        vision.processor.do_image_splitting, vision.crops_per_image = False, 1
    assert ours_ids == ids
    with torch.inference_mode():
        want = model(**inputs).logits[0].numpy()
    assert np.abs(got - want).max() < VISION_LOGITS_BOUND
