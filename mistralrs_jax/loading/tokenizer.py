"""Text <-> token ids: a Hugging Face `tokenizer.json`, or one rebuilt from GGUF metadata.

A GGUF file carries no `tokenizer.json`; it stores the vocabulary, merges and special ids as
metadata under llama.cpp's key names, and names its pre-tokenizer (`tokenizer.ggml.pre`) instead of
spelling it out. We rebuild an equivalent `tokenizers.Tokenizer` from those facts, following
llama.cpp's reading of them (src/llama-vocab.cpp): its list of split regexes per pre-tokenizer name,
its defaults for adding BOS/EOS, and its way of finding end-of-generation tokens. The rebuilt
tokenizer is checked against llama.cpp's own vocab test vectors in tests/test_tokenizer.py.

`IncrementalDetokenizer` turns a stream of generated ids into text that is safe to send as it comes.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from mistralrs_jax.loading.gguf import read_gguf_metadata
from mistralrs_jax.errors import CorruptModelFileError, ModelLoadError, ModelNotFoundError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

# llama.cpp's token types (enum llama_token_type), stored in `tokenizer.ggml.token_type`.
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# Added tokens that end generation although the file may not name them as EOS/EOT. llama.cpp finds
# these by their text (llama-vocab.cpp, "special_eog_ids"): turn ends, plus the fill-in-the-middle
# pad / repo / file-separator tokens, after which a code model has nothing more to say.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
    }
)
# llama.cpp takes the first of each group it finds; each group is one role.
FILL_IN_THE_MIDDLE_END_TEXTS = (
    ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("<|file_sep|>",),
)


def _end_of_generation_ids(added: dict[int, str]) -> set[int]:
    """Ids among the added (special or user-defined) tokens that end generation, by llama.cpp's rules."""
    by_text = {text: index for index, text in sorted(added.items(), reverse=True)}  # lowest id wins
    ends = {index for text, index in by_text.items() if text in END_OF_GENERATION_TEXTS}
    for group in FILL_IN_THE_MIDDLE_END_TEXTS:
        found = [by_text[text] for text in group if text in by_text]
        if found:
            ends.add(min(found))
    # gpt-oss / Solar Open: "<|end|>" ends a message there, not the generation.
    texts = set(by_text)
    if "<|end|>" in texts and (({"<|return|>", "<|call|>"} <= texts) or ({"<|calls|>", "<|flush|>"} <= texts)):
        ends.discard(by_text["<|end|>"])
    # Gemma 4 has an ordinary "</s>".
    if "</s>" in texts and "<|tool_response>" in texts:
        ends.discard(by_text["</s>"])
    return ends


# --- Pre-tokenizer presets ----------------------------------------------------------------------
# llama.cpp splits text with a list of regexes applied one after another: each one cuts every piece
# further, and both the matches and the text between them stay pieces. That is exactly a sequence of
# `Split(regex, behavior="isolated")` here. The regexes are the ones the models' tokenizer.json use
# (llama.cpp rewrites a few to suit std::regex; Oniguruma takes the originals).

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK3_WORDS = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK_DEEPSEEK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+"
)
_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclass(frozen=True)
class _BpePreset:
    """How llama.cpp splits text for one `tokenizer.ggml.pre` value, and its defaults for it."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a token is taken whole (Llama 3 style)
    add_bos: bool = False


def _presets() -> dict[str, _BpePreset]:
    gpt2 = _BpePreset((_GPT2,))
    llama3 = _BpePreset((_LLAMA3,), ignore_merges=True, add_bos=True)
    qwen2 = _BpePreset((_QWEN2,))
    digits_then_gpt2 = _BpePreset((r"\p{N}", _GPT2))
    gpt4o = _BpePreset((_GPT4O,))
    deepseek3 = _BpePreset((r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3_WORDS))
    bloom = _BpePreset((_BLOOM,))
    table: dict[str, _BpePreset] = {
        # llama.cpp's fallback when a file names no pre-tokenizer
        "default": _BpePreset((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
        "deepseek-llm": _BpePreset(
            ("[\r\n]", _DEEPSEEK_LLM_LETTERS, _DEEPSEEK_LLM_PUNCT, r"\s+$", _CJK_DEEPSEEK, r"\p{N}+")
        ),
        "deepseek-coder": _BpePreset(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_DEEPSEEK, r"\p{N}")),
        "deepseek-v3": deepseek3,
        "hunyuan-dense": deepseek3,
        "falcon": _BpePreset((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]")),
        "qwen35": _BpePreset((_QWEN35,)),
        "tekken": _BpePreset((_TEKKEN,), ignore_merges=True, add_bos=True),
        "chatglm-bpe": _BpePreset((_LLAMA3,)),
        "glm4": _BpePreset((_LLAMA3,), ignore_merges=True),
        "viking": _BpePreset((_BLOOM, r"\p{N}")),
        "seed-coder": _BpePreset(
            (
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+",
            )
        ),
        "bailingmoe": _BpePreset(
            (
                r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                r"|\s*[\r\n]|\s+(?!\S)|\s+",
            )
        ),
    }
    aliases = {  # several `tokenizer.ggml.pre` names share one preset in llama.cpp
        llama3: "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
        _BpePreset((_LLAMA3,)): "dbrx smaug-bpe",
        digits_then_gpt2: "starcoder refact command-r smollm codeshell exaone minerva-7b",
        gpt2: "gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de mpt olmo jais trillion granite-docling "
        "jina-v1-en jina-v2-code roberta-bpe exaone4 a.x-4.0 mellum",
        qwen2: "qwen2 deepseek-r1-qwen stablelm2 megrez hunyuan grok-2 kormo",
        gpt4o: "gpt-4o llama4 minimax-m2 kanana2",
        bloom: "poro-chat bloom gpt3-finnish",
    }
    for preset, names in aliases.items():
        table.update(dict.fromkeys(names.split(), preset))
    return table


BPE_PRESETS: dict[str, _BpePreset] = _presets()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, in which byte-level vocabularies are spelled."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


# --- Building a `tokenizers.Tokenizer` from GGUF metadata ---------------------------------------


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after position 0, so a merge whose left part is " " still parses.
    cut = merge.find(" ", 1)
    if cut < 0:
        raise CorruptModelFileError(f"GGUF tokenizer merge {merge!r} has no space separating its two parts")
    return merge[:cut], merge[cut + 1 :]


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def _merges_from_scores(
    tokens: Sequence[str], scores: Sequence[float], token_types: Sequence[int]
) -> list[tuple[str, str]]:
    """SentencePiece BPE merges two pieces when the joined piece is in the vocabulary, best score first.

    A BPE model with ranked merges does the same if the merges are every split of every normal token into
    two normal tokens, ranked by the joined token's score (ties by id, SentencePiece's own order).
    """
    normal = {token: index for index, token in enumerate(tokens) if token_types[index] == TOKEN_TYPE_NORMAL}
    ranked = sorted(normal.items(), key=lambda item: (-scores[item[1]], item[1]))
    merges: list[tuple[str, str]] = []
    for token, _ in ranked:
        splits = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in normal and token[cut:] in normal
        ]
        if len(splits) > 1:
            splits.sort(key=lambda pair: (normal[pair[0]], normal[pair[1]]))
        merges.extend(splits)
    return merges


def _byte_level_model(
    fields: dict[str, Any], tokens: Sequence[str], token_types: Sequence[int], preset: _BpePreset
) -> tokenizers.Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Normal tokens are stored in the byte alphabet; a few converters wrote plain UTF-8 instead, so
    # respell those -- unless the respelled token already exists (Command-R lists both "\u200d" and
    # its byte spelling; the raw one is unreachable, as in the original tokenizer).
    existing = set(tokens)
    respelled = list(tokens)
    for index, token in enumerate(tokens):
        if token_types[index] == TOKEN_TYPE_NORMAL and not set(token) <= alphabet:
            spelled = "".join(spelling[b] for b in token.encode("utf-8"))
            if spelled not in existing:
                respelled[index] = spelled
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise CorruptModelFileError("GGUF byte-level BPE tokenizer has no `tokenizer.ggml.merges`")
    model = models.BPE(
        vocab=_vocab_dict(respelled),
        merges=[_split_merge(m) for m in merges],
        ignore_merges=preset.ignore_merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    hf = tokenizers.Tokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in preset.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_model(
    fields: dict[str, Any], tokens: Sequence[str], token_types: Sequence[int], add_space_prefix: bool
) -> tokenizers.Tokenizer:
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None:
        raise CorruptModelFileError("GGUF SentencePiece tokenizer has no `tokenizer.ggml.scores`")
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=_vocab_dict(tokens),
        merges=_merges_from_scores(tokens, scores, token_types),
        unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    hf = tokenizers.Tokenizer(model)
    # llama.cpp prepends a space to every run of text (after a special token too) and keeps each run
    # whole: no pre-tokenizer, just the normalizer.
    steps = [normalizers.Prepend(SPIECE_SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_SPACE)])
    parts = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(parts)
    return hf


def _gemma4_model(fields: dict[str, Any], tokens: Sequence[str]) -> tokenizers.Tokenizer:
    """Gemma 4: BPE with explicit merges over raw UTF-8 where spaces are "▁", cut only at newlines."""
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise CorruptModelFileError("GGUF gemma4 tokenizer has no `tokenizer.ggml.merges`")
    model = models.BPE(vocab=_vocab_dict(tokens), merges=[_split_merge(m) for m in merges], byte_fallback=True)
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    hf.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return hf


def _wordpiece_model(fields: dict[str, Any], tokens: Sequence[str]) -> tokenizers.Tokenizer:
    """BERT. llama.cpp's converter marks word-initial pieces with "▁" and drops "##" from the others;
    undo that to get WordPiece's spelling back."""

    def original(token: str) -> str:
        if token.startswith(SPIECE_SPACE):
            return token[1:]
        if token.startswith("[") and token.endswith("]"):
            return token
        return "##" + token

    vocab = _vocab_dict([original(t) for t in tokens])
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", 100)
    model = models.WordPiece(vocab=vocab, unk_token=original(tokens[unk_id]), max_input_chars_per_word=100)
    hf = tokenizers.Tokenizer(model)
    lowercase = bool(fields.get("tokenizer.ggml.normalizer.lowercase", True))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    return hf


def _whitespace_stripping(fields: dict[str, Any]) -> tuple[set[str], set[str] | None]:
    """Special tokens that swallow the whitespace beside them, by llama.cpp's per-model rules (the
    original tokenizers mark them `lstrip`/`rstrip`). Returns (lstrip texts, rstrip texts); `None`
    for rstrip means "every special token but BOS/UNK/<|endoftext|>" (Phi-3's `<|user|>` eats the
    newline after it)."""
    name = str(fields.get("general.name", "")).lower()
    pre = str(fields.get("tokenizer.ggml.pre", ""))
    arch = str(fields.get("general.architecture", ""))
    if any(key in pre for key in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or arch in (
        "nomic-bert-moe",
        "jina-bert-v3",
    ):
        return {"<mask>"}, set()
    if "phi-3" in name or "phi3" in name:
        return set(), None
    if "modern-bert" in name:
        return {"[MASK]"}, set()
    return set(), set()


def _register_special_tokens(
    hf: tokenizers.Tokenizer, fields: dict[str, Any], tokens: Sequence[str], token_types: Sequence[int]
) -> None:
    """Tokens llama.cpp matches whole in text become added tokens. Control and unknown ones are special
    (dropped by skip_special_tokens); user-defined ones are plain, so they always show, as in llama.cpp."""
    lstrip, rstrip = _whitespace_stripping(fields)
    never_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    special, plain = [], []
    for index, token_type in enumerate(token_types[: len(tokens)]):
        if token_type not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN):
            continue
        text = tokens[index]
        strip_right = text not in never_rstrip if rstrip is None else text in rstrip
        added = AddedToken(
            text,
            special=token_type != TOKEN_TYPE_USER_DEFINED,
            normalized=False,
            lstrip=text in lstrip,
            rstrip=strip_right,
        )
        (plain if token_type == TOKEN_TYPE_USER_DEFINED else special).append(added)
    if special:
        hf.add_special_tokens(special)
    if plain:
        hf.add_tokens(plain)


def _id_field(fields: dict[str, Any], key: str, n_tokens: int) -> int | None:
    value = fields.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n_tokens else None


# --- The tokenizer ------------------------------------------------------------------------------


class Tokenizer:
    """One tokenizer whatever its source: encode, decode, and the special ids the engine needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        prefix_ids: Sequence[int] | None = None,
        suffix_ids: Sequence[int] | None = None,
        chat_template: str | None = None,
        chat_templates: dict[str, str] | None = None,
        source: str = "",
    ):
        """`prefix_ids`/`suffix_ids` override what `add_special_tokens` puts around the text (BERT's
        [CLS] ... [SEP]); by default BOS if add_bos and EOS if add_eos."""
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = bool(add_bos) and bos_token_id is not None
        self.add_eos = bool(add_eos) and eos_token_id is not None
        self._prefix_ids = list(prefix_ids) if prefix_ids is not None else [bos_token_id] if self.add_bos else []
        self._suffix_ids = list(suffix_ids) if suffix_ids is not None else [eos_token_id] if self.add_eos else []
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        self.source = source
        added = backend.get_added_tokens_decoder()
        self.special_token_ids: set[int] = {index for index, token in added.items() if token.special}
        ends = {int(i) for i in eos_token_ids} | _end_of_generation_ids({i: t.content for i, t in added.items()})
        if eos_token_id is not None:
            ends.add(eos_token_id)
        self.eos_token_ids: set[int] = ends

    # construction

    @classmethod
    def from_gguf_metadata(cls, fields: dict[str, Any], source: str = "<gguf metadata>") -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes from its metadata (key -> plain Python value)."""
        model_type = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not model_type or not tokens:
            raise ModelLoadError(
                f"{source} has no tokenizer metadata (`tokenizer.ggml.model`/`tokenizer.ggml.tokens`); "
                "pass a tokenizer with --tokenizer or use a GGUF converted with a vocabulary"
            )
        tokens = [str(t) for t in tokens]
        n_tokens = len(tokens)
        token_types = list(fields.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * n_tokens)
        if len(token_types) < n_tokens:
            raise CorruptModelFileError(f"{source}: fewer token types ({len(token_types)}) than tokens ({n_tokens})")
        ids = {
            key: _id_field(fields, key, n_tokens)
            for key in (
                "bos_token_id",
                "eos_token_id",
                "eot_token_id",
                "eom_token_id",
                "padding_token_id",
                "cls_token_id",
                "seperator_token_id",
            )
        }
        bos, eos = ids["bos_token_id"], ids["eos_token_id"]
        add_eos = False
        suffix: list[int] | None = None
        if model_type == "gpt2":
            pre = fields.get("tokenizer.ggml.pre") or "default"
            if pre not in BPE_PRESETS:
                raise UnsupportedArchitectureError(
                    f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; known: {sorted(BPE_PRESETS)}"
                )
            preset = BPE_PRESETS[pre]
            backend = _byte_level_model(fields, tokens, token_types, preset)
            add_bos = preset.add_bos
        elif model_type == "llama":
            backend = _sentencepiece_model(
                fields, tokens, token_types, bool(fields.get("tokenizer.ggml.add_space_prefix", True))
            )
            add_bos = True
        elif model_type == "gemma4":
            backend = _gemma4_model(fields, tokens)
            add_bos = True
        elif model_type == "bert":
            backend = _wordpiece_model(fields, tokens)
            # BERT frames text as [CLS] ... [SEP]; llama.cpp treats [CLS] as its BOS and adds [SEP] after.
            bos = ids["cls_token_id"] if ids["cls_token_id"] is not None else bos
            add_bos = True
            if fields.get("tokenizer.ggml.add_sep_token", True) and ids["seperator_token_id"] is not None:
                suffix = [ids["seperator_token_id"]]
        else:
            raise UnsupportedArchitectureError(
                f"{source}: GGUF tokenizer model {model_type!r} is not supported (supported: gpt2, llama, gemma4, bert)"
            )
        _register_special_tokens(backend, fields, tokens, token_types)
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos))
        add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", add_eos))
        templates = {
            key[len("tokenizer.chat_template.") :]: value
            for key, value in fields.items()
            if key.startswith("tokenizer.chat_template.") and isinstance(value, str)
        }
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=[i for i in (ids["eot_token_id"], ids["eom_token_id"]) if i is not None],
            pad_token_id=ids["padding_token_id"],
            add_bos=add_bos,
            add_eos=add_eos,
            suffix_ids=suffix,
            chat_template=fields.get("tokenizer.chat_template"),
            chat_templates=templates,
            source=source,
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        """A Hugging Face model directory: tokenizer.json plus the configs that name special tokens and the template."""
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise ModelNotFoundError(
                f"no tokenizer.json in {path}; this engine needs the fast-tokenizer file "
                "(save it with transformers' `tokenizer.save_pretrained`)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(tokenizer_json)
        except Exception as exc:  # the library raises plain Exception for malformed files
            raise CorruptModelFileError(f"{tokenizer_json} cannot be read: {exc}") from exc
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        generation = _read_json(os.path.join(path, "generation_config.json"))

        def token_id(name: str) -> int | None:
            text = _token_text(config.get(name)) or _token_text(special_map.get(name))
            return backend.token_to_id(text) if text else None

        bos = token_id("bos_token")
        eos = token_id("eos_token")
        pad = token_id("pad_token")
        if bos is None and isinstance(generation.get("bos_token_id"), int):
            bos = generation["bos_token_id"]
        generation_eos = generation.get("eos_token_id")
        eos_list = (
            generation_eos
            if isinstance(generation_eos, list)
            else [generation_eos] if isinstance(generation_eos, int) else []
        )
        if eos is None and eos_list:
            eos = eos_list[0]
        if pad is None and isinstance(generation.get("pad_token_id"), int):
            pad = generation["pad_token_id"]

        # What the file's post-processor puts around the text decides, unless the config says otherwise.
        plain = backend.encode("a", add_special_tokens=False).ids
        framed = backend.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(framed) - len(plain) + 1) if framed[i : i + len(plain)] == plain), 0)
        prefix, suffix = framed[:start], framed[start + len(plain) :]
        add_bos = bool(config.get("add_bos_token", bos is not None and prefix == [bos]))
        add_eos = bool(config.get("add_eos_token", eos is not None and suffix == [eos]))
        prefix_ids = None if "add_bos_token" in config or prefix in ([], [bos]) else prefix
        suffix_ids = None if "add_eos_token" in config or suffix in ([], [eos]) else suffix
        backend.post_processor = None  # `encode` adds them itself, the same way for every source

        chat_template, templates = _hf_chat_templates(path, config)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=eos_list,
            pad_token_id=pad,
            add_bos=add_bos,
            add_eos=add_eos,
            prefix_ids=prefix_ids,
            suffix_ids=suffix_ids,
            chat_template=chat_template,
            chat_templates=templates,
            source=path,
        )

    # encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (like `<|im_start|>`) map to their ids;
        `add_special_tokens` adds BOS/EOS where the model asks for them."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = self._prefix_ids + ids + self._suffix_ids
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of an already-rendered chat prompt: BOS is added only if the template did not write it."""
        ids = self.encode(text, add_special_tokens=True)
        if self.add_bos and len(ids) >= 2 and ids[1] == self.bos_token_id:
            ids.pop(0)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # vocabulary

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @functools.cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of SentencePiece byte-fallback tokens `<0xNN>` (none in a byte-level vocabulary)."""
        return frozenset(
            index
            for token, index in self.backend.get_vocab(with_added_tokens=False).items()
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        )

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise CorruptModelFileError(f"{path} is not valid JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _hf_chat_templates(path: str, config: dict[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The default chat template and the named ones. Newer transformers save them as separate files."""
    templates: dict[str, str] = {}
    value = config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        templates.update(
            {item["name"]: item["template"] for item in value if isinstance(item, dict) and "name" in item}
        )
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as handle:
            templates["default"] = handle.read()
    json_file = _read_json(os.path.join(path, "chat_template.json"))
    if isinstance(json_file.get("chat_template"), str):
        templates.setdefault("default", json_file["chat_template"])
    default = templates.pop("default", None)
    return default, templates


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a `.gguf` file (metadata only, vocab-only files work) or of a HF model directory."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"tokenizer source not found: {path} (give a .gguf file or a model directory)")
    if os.path.isdir(path):
        return Tokenizer.from_hf_dir(path)
    if path.endswith(".json"):
        return Tokenizer.from_hf_dir(os.path.dirname(path) or ".")
    fields = read_gguf_metadata(path)
    return Tokenizer.from_gguf_metadata(fields, source=path)


# --- Streaming ----------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Text for a growing list of ids, released only when it is final.

    Each push decodes a short window of recent ids twice, with and without the new ones, and releases the
    difference. Decoding a window (not single tokens) keeps the tokenizer's own rules -- byte-level
    merging, SentencePiece's "▁" spaces and byte fallback -- so the released pieces join up to exactly
    `decode(all_ids)`. Text is held back while it may still change:
      * it ends in U+FFFD: an incomplete UTF-8 sequence waiting for more bytes;
      * the last id is a byte-fallback token (`<0xNN>`): the decoder turns a whole run of those into
        text, or into one U+FFFD per byte if the run is not valid UTF-8, only once the run ends.
    A window never starts inside such a run or on an id that decodes to nothing (a skipped special
    token), because a decoder's start-of-text rules (SentencePiece strips one leading space) must only
    touch text that was already released.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self._byte_ids = tokenizer.byte_token_ids
        # With a prompt, the window starts inside it so the first generated token decodes in context
        # (its leading space is kept), but nothing of the prompt itself is released.
        self.read_offset = len(self.ids)
        self.prefix_offset = self._prompt_window_start()

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special_tokens)

    def _inside_byte_run(self, index: int) -> bool:
        return index > 0 and self.ids[index] in self._byte_ids and self.ids[index - 1] in self._byte_ids

    def _prompt_window_start(self) -> int:
        for start in range(self.read_offset - 1, max(self.read_offset - 16, 0) - 1, -1):
            if not self._inside_byte_run(start):
                text = self._decode(start, self.read_offset)
                if text and not text.startswith("\ufffd"):
                    return start
        return 0 if self.read_offset <= 16 else self.read_offset - 16

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now final (possibly empty)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if token_id in self._byte_ids:
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        new_text = full_text[len(prefix_text) :]
        if self._decode(self.read_offset):
            self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text

    def flush(self) -> str:
        """Whatever is still held back (an unfinished UTF-8 sequence decodes to U+FFFD here)."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
