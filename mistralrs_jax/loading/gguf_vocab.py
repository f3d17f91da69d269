"""Rebuilding a `tokenizers.Tokenizer` from the vocabulary a GGUF file stores as metadata.

A GGUF file carries no `tokenizer.json`; it stores the vocabulary, merges and special ids under
llama.cpp's key names, and names its pre-tokenizer (`tokenizer.ggml.pre`) instead of spelling it
out. This module turns those facts into an equivalent `tokenizers.Tokenizer`, following
llama.cpp's reading of them (src/llama-vocab.cpp): its split regexes per pre-tokenizer name, its
defaults for adding BOS/EOS, and its way of finding end-of-generation tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from mistralrs_jax.errors import CorruptModelFileError

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


def end_of_generation_ids(added: dict[int, str]) -> set[int]:
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


def byte_level_model(
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


def sentencepiece_model(
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


def gemma4_model(fields: dict[str, Any], tokens: Sequence[str]) -> tokenizers.Tokenizer:
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


def wordpiece_model(fields: dict[str, Any], tokens: Sequence[str]) -> tokenizers.Tokenizer:
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


def register_special_tokens(
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


def id_field(fields: dict[str, Any], key: str, n_tokens: int) -> int | None:
    value = fields.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    value = int(value)
    return value if 0 <= value < n_tokens else None
