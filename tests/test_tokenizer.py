"""Tokenizers rebuilt from GGUF metadata, checked against references nobody here wrote:
llama.cpp's vocab test vectors (made with the models' original Hugging Face tokenizers), llama.cpp
itself (llama-cpp-python), Hugging Face transformers, and the `gguf` library's own reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import _vocab_fixtures as fixtures
from mistralrs_jax.errors import CorruptModelFileError, ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError
from mistralrs_jax.loading.detokenizer import IncrementalDetokenizer
from mistralrs_jax.loading.gguf import read_gguf_metadata
from mistralrs_jax.loading.gguf_vocab import BPE_PRESETS, TOKEN_TYPE_NORMAL
from mistralrs_jax.loading.tokenizer import Tokenizer, load_tokenizer

# Every vocab in llama.cpp's models/ folder that comes with test vectors.
VOCABS_WITH_VECTORS = [
    "llama-spm",
    "llama-bpe",
    "qwen2",
    "gpt-2",
    "phi-3",
    "starcoder",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "mpt",
    "command-r",
    "refact",
    "bert-bge",
    "gemma-4",
    "qwen35",
]
# Varied text: unicode, CJK, emoji (incl. ZWJ sequences), code, whitespace runs, numbers, special tokens.
TEXTS = [
    "Hello world",
    " Hello  world ",
    "Ünïcödé façade naïve — “quotes” ½ ² ٣",
    "日本語のテキストと中文字符，한국어 텍스트",
    "emoji 🦙🚀 😶‍🌫️ 👨‍👩‍👧‍👦 ✅",
    "def f(x):\n    return x ** 2  # square\n\n\n\tprint(f(3))\r\n",
    "    leading\n\n\n   trailing   \t\t",
    "3.14159 1,000,000 12345678901234567890 0x1F",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they've said 'it's FINE' — y'all'll see",
    "a<|endoftext|>b<|im_end|>",
    "",
]


def _vocab_dir_or_skip() -> Path:
    try:
        return fixtures.llama_cpp_vocab_dir()
    except fixtures.ReferenceUnavailable as exc:
        pytest.skip(f"llama.cpp vocab files unavailable: {exc}")


def _llama_cpp_or_skip():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install '.[peers]'); it is the reference here")
    return llama_cpp


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    try:
        path = fixtures.smollm2_gguf()
    except fixtures.ReferenceUnavailable as exc:
        pytest.skip(str(exc))
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Tokenizer:
    return load_tokenizer(str(smollm2_path))


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference tokenizer here")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


_built: dict[str, Tokenizer] = {}


def _vocab_tokenizer(name: str) -> Tokenizer:
    if name not in _built:
        _built[name] = load_tokenizer(str(_vocab_dir_or_skip() / f"ggml-vocab-{name}.gguf"))
    return _built[name]


# --- llama.cpp's vocab test vectors ------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS_WITH_VECTORS)
def test_llama_cpp_vocab_vectors(name):
    """test-tokenizer-0 semantics: encode with add_special=false (no BOS), special tokens not parsed
    (none appear in the inputs), ids must match exactly; decoding the expected ids gives the text back."""
    tokenizer = _vocab_tokenizer(name)
    cases = fixtures.vocab_cases(name)
    assert len(cases) >= 40
    wrong = [
        (text, ids, tokenizer.encode(text, add_special_tokens=False))
        for text, ids in cases
        if tokenizer.encode(text, add_special_tokens=False) != ids
    ]
    assert not wrong, f"{len(wrong)}/{len(cases)} cases differ, first: {wrong[0]!r}"
    if name != "bert-bge":  # WordPiece lowercases and drops whitespace: no round trip by design
        undecoded = [(text, tokenizer.decode(ids)) for text, ids in cases if tokenizer.decode(ids) != text]
        assert not undecoded, undecoded[:3]


def test_every_pre_tokenizer_preset_compiles_and_keeps_all_text():
    """Presets without llama.cpp vectors still have to be valid Oniguruma and lose no text when splitting."""
    from tokenizers import Regex, pre_tokenizers

    sample = "Hello, World! It's 2024: 12345 ½ 日本語 한국어 ÀÉÎ µ \t\n\r\n  x   ’quote’ 🦙 ...!? ’s"
    for name, preset in BPE_PRESETS.items():
        splitter = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in preset.splits])
        pieces = [piece for piece, _ in splitter.pre_tokenize_str(sample)]
        assert "".join(pieces) == sample, name
        assert len(pieces) > 10, name


def test_vocab_only_gguf_metadata_matches_gguf_library():
    """Our fast metadata reader returns what the `gguf` package's GGUFReader returns."""
    gguf = pytest.importorskip("gguf")
    path = _vocab_dir_or_skip() / "ggml-vocab-phi-3.gguf"
    reader = gguf.GGUFReader(str(path))
    expected = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert len(reader.tensors) == 0
    ours = read_gguf_metadata(str(path))
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == value, key
    assert isinstance(ours["tokenizer.chat_template"], str) and len(ours["tokenizer.ggml.tokens"]) == 32064


@pytest.mark.parametrize(
    "name",
    [
        "llama-spm",
        "llama-bpe",
        "qwen2",
        "gpt-2",
        "phi-3",
        "starcoder",
        "command-r",
        "refact",
        "gemma-4",
        "deepseek-coder",
        "bert-bge",
        "smollm2",
    ],
)
def test_special_ids_and_end_of_generation_match_llama_cpp(name, smollm2_path, smollm2):
    """BOS/EOS ids, whether BOS/EOS are added, and the end-of-generation set, as llama.cpp reads the file.
    llama.cpp also promotes a few *normal*-type tokens by their text (Qwen2's stray "</s>"); we keep to
    tokens the file marks special, or names as EOS/EOT/EOM."""
    llama_cpp = _llama_cpp_or_skip()
    path = str(smollm2_path if name == "smollm2" else _vocab_dir_or_skip() / f"ggml-vocab-{name}.gguf")
    ours = smollm2 if name == "smollm2" else _vocab_tokenizer(name)
    fields = read_gguf_metadata(path)
    types = fields["tokenizer.ggml.token_type"]
    named = {fields.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")}

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    assert model, f"llama.cpp could not load {path}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
        candidates = [t for t in range(n_tokens) if types[t] != TOKEN_TYPE_NORMAL or t in named]
        eog = {t for t in candidates if llama_cpp.llama_vocab_is_eog(vocab, t)}
        bos, eos = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)
        add_bos, add_eos = llama_cpp.llama_vocab_get_add_bos(vocab), llama_cpp.llama_vocab_get_add_eos(vocab)
    finally:
        llama_cpp.llama_model_free(model)
    assert ours.eos_token_ids == eog
    assert (ours.bos_token_id, ours.eos_token_id) == (bos if bos >= 0 else None, eos if eos >= 0 else None)
    assert (ours.add_bos, ours.add_eos) == (bool(add_bos), bool(add_eos))
    assert ours.vocab_size == n_tokens


def test_add_special_tokens_and_rendered_prompts():
    spm = _vocab_tokenizer("llama-spm")
    plain = spm.encode("Hello", add_special_tokens=False)
    assert spm.encode("Hello") == [spm.bos_token_id] + plain
    # A template that writes BOS itself must not get a second one.
    assert spm.encode_prompt("<s>Hello") == [spm.bos_token_id] + plain
    assert spm.encode_prompt("Hello") == [spm.bos_token_id] + plain
    bert = _vocab_tokenizer("bert-bge")
    assert bert.encode("hi") == [101, *bert.encode("hi", add_special_tokens=False), 102]  # [CLS] ... [SEP]
    # Control tokens written in text are matched whole; decode drops them unless asked to keep them.
    # (llama.cpp starts every text run after a special token with SentencePiece's space: "▁b".)
    ids = spm.encode("a</s>b", add_special_tokens=False)
    assert spm.eos_token_id in ids
    assert spm.decode(ids) == "a b" and spm.decode(ids, skip_special_tokens=False) == "a</s> b"


CHAT_MARKUP = [
    "a</s>b",
    "<s>Hello",
    "x <s> y",
    "<unk> z [PAD32011] q",
    "<|endoftext|>  x",
    "<|user|>\nhi<|end|>\n<|assistant|>",
    "<|system|> sys <|end|>  \n\n <|user|>",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    '<start_of_turn>user\nhi<end_of_turn>\n<|turn>x<turn|> <|"|>q',
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>hi<|END_OF_TURN_TOKEN|>",
    "[CLS] hi [SEP] [MASK]",
]


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "qwen2", "gemma-4", "llama-bpe", "command-r", "bert-bge"])
def test_special_token_parsing_matches_llama_cpp(name):
    """Chat markup with special tokens, BOS/EOS added: ids as llama.cpp gives them (Phi-3's special tokens
    swallow the whitespace after them; SentencePiece text after a special token starts with a space)."""
    llama_cpp = _llama_cpp_or_skip()
    path = str(_vocab_dir_or_skip() / f"ggml-vocab-{name}.gguf")
    reference = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    ours = _vocab_tokenizer(name)
    for text in CHAT_MARKUP:
        if name == "qwen2" and "</s>" in text:
            continue  # llama.cpp promotes Qwen2's ordinary "</s>" token to a control token by its text
        assert ours.encode(text) == reference.tokenize(text.encode("utf-8"), add_bos=True, special=True), text


# --- SmolLM2 (the default model) against transformers and llama.cpp ------------------------------


def test_smollm2_matches_transformers(smollm2, smollm2_transformers):
    reference = smollm2_transformers
    for text in TEXTS:
        if any(ch in text for ch in "½²٣"):
            continue  # transformers' GGUF converter differs from llama.cpp here; see the llama.cpp test below
        expected = reference.encode(text, add_special_tokens=True)
        assert smollm2.encode(text) == expected, text
        for skip in (True, False):
            assert smollm2.decode(expected, skip_special_tokens=skip) == reference.decode(
                expected, skip_special_tokens=skip
            )
        assert smollm2.decode(expected, skip_special_tokens=False) == text
    assert smollm2.vocab_size == len(reference)
    assert (smollm2.bos_token, smollm2.eos_token) == (reference.bos_token, reference.eos_token)
    assert smollm2.pad_token_id == reference.pad_token_id
    assert smollm2.chat_template == reference.chat_template
    assert smollm2.special_token_ids == set(reference.all_special_ids) | {
        i for i, tok in reference.added_tokens_decoder.items() if tok.special
    }


def test_smollm2_matches_llama_cpp(smollm2, smollm2_path):
    """llama.cpp splits every numeral (\\p{N}) apart for SmolLM's "smollm" pre-tokenizer, as the original
    tokenizer's Digits step does; transformers' GGUF converter keeps " ½" whole."""
    llama_cpp = _llama_cpp_or_skip()
    llm = llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)
    for text in TEXTS + [" ½ ① Ⅻ ٣٤", "x²+y² = r²"]:
        expected = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert smollm2.encode(text) == expected, text


def test_hf_directory_matches_transformers(tmp_path, smollm2, smollm2_transformers):
    """A model directory as transformers writes it (tokenizer.json, tokenizer_config.json, template file)."""
    smollm2_transformers.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    loaded = load_tokenizer(str(tmp_path))
    for text in TEXTS:
        expected = smollm2_transformers.encode(text, add_special_tokens=True)
        assert loaded.encode(text) == expected, text
        assert loaded.decode(expected) == smollm2_transformers.decode(expected, skip_special_tokens=True)
    assert (loaded.bos_token, loaded.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert loaded.eos_token_ids >= {0, 2}
    assert loaded.add_bos is False
    assert loaded.chat_template == smollm2.chat_template


# --- streaming detokenization -----------------------------------------------------------------


def _streamed(tokenizer: Tokenizer, ids, skip: bool, prompt=()) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip, prompt_ids=prompt)
    pieces = [detokenizer.push(i) for i in ids]
    return pieces, detokenizer.flush()


@pytest.mark.parametrize("name", ["smollm2", "llama-spm", "phi-3", "qwen2", "gemma-4"])
def test_incremental_detokenizer_equals_decode(name, smollm2):
    tokenizer = smollm2 if name == "smollm2" else _vocab_tokenizer(name)
    rng = random.Random(1234)
    specials = sorted(tokenizer.special_token_ids)
    byte_ids = sorted(tokenizer.byte_token_ids)
    sequences = []
    for text in TEXTS:
        sequences.append((tokenizer.encode(text), True))
    for _ in range(60):  # real text with special tokens spliced in
        text = "".join(
            rng.choice(["🦙", "😶‍🌫️", "✅", " a", "é", "日本", " ", "\n", "Hello", " world", "½"]) for _ in range(12)
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        sequences.append((list(ids), True))
        for _ in range(3):  # may land inside a character's bytes: no longer valid text
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        sequences.append((ids, False))
    for _ in range(60):  # arbitrary ids, including runs of byte tokens that are not valid UTF-8
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        if byte_ids:
            for _ in range(4):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice(byte_ids))
        sequences.append((ids, False))
    for ids, valid_text in sequences:
        for skip in (True, False):
            pieces, tail = _streamed(tokenizer, ids, skip)
            assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=skip), ids
            if valid_text:
                assert not any("\ufffd" in piece for piece in pieces), (ids, pieces)


def test_incremental_detokenizer_holds_split_characters(smollm2):
    spm = _vocab_tokenizer("llama-spm")
    ids = spm.encode("🦙", add_special_tokens=False)
    assert len(ids) == 5 and set(ids[1:]) <= spm.byte_token_ids  # "▁" then four byte tokens <0xF0>...
    pieces, tail = _streamed(spm, ids, True)
    # A run of byte tokens is only final once a non-byte token follows (or the stream ends).
    assert pieces == [""] * 5 and tail == "🦙"  # ("▁" is stripped as the first space)
    pieces, tail = _streamed(spm, ids + [spm.token_to_id("!")], True)
    assert pieces == [""] * 5 + ["🦙!"] and tail == ""
    # Byte-level: the emoji spans several tokens, nothing is released until it is whole.
    ids = smollm2.encode("🦙!", add_special_tokens=False)
    pieces, tail = _streamed(smollm2, ids, True)
    assert [p for p in pieces if p] == ["🦙", "!"] and tail == ""
    # An unfinished character at the end is given up by flush as U+FFFD, like decode does.
    pieces, tail = _streamed(smollm2, ids[:1], True)
    assert pieces == [""] and tail == smollm2.decode(ids[:1]) and tail.endswith("\ufffd")


def test_incremental_detokenizer_keeps_leading_space_after_prompt():
    """SentencePiece's decoder strips the first leading space of a text; a generated token that follows a
    prompt keeps it when the prompt is given as context."""
    spm = _vocab_tokenizer("llama-spm")
    prompt = spm.encode("[INST] hi [/INST]")
    generated = spm.encode("Hello there", add_special_tokens=False)
    alone, _ = _streamed(spm, generated, True)
    assert "".join(alone) == "Hello there"
    in_context, tail = _streamed(spm, generated, True, prompt=prompt)
    full, before = spm.decode(prompt + generated), spm.decode(prompt)
    assert "".join(in_context) + tail == full[len(before) :] == " Hello there"


# --- errors a user can cause -------------------------------------------------------------------


def test_missing_and_unusable_files(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        load_tokenizer(str(missing))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CorruptModelFileError, match="garbage.gguf"):
        load_tokenizer(str(garbage))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CorruptModelFileError, match="empty.gguf"):
        load_tokenizer(str(empty))
    truncated = tmp_path / "truncated.gguf"
    source = _vocab_dir_or_skip() / "ggml-vocab-llama-spm.gguf"
    truncated.write_bytes(source.read_bytes()[:5000])
    with pytest.raises(CorruptModelFileError, match="truncated.gguf"):
        load_tokenizer(str(truncated))
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_gguf_without_vocabulary_or_with_unknown_pre_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "novocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="novocab.gguf"):
        load_tokenizer(str(path))
    fields = read_gguf_metadata(str(_vocab_dir_or_skip() / "ggml-vocab-gpt-2.gguf"))
    fields["tokenizer.ggml.pre"] = "no-such-pre-tokenizer"
    with pytest.raises(UnsupportedArchitectureError, match="no-such-pre-tokenizer"):
        Tokenizer.from_gguf_metadata(fields, source="edited")
