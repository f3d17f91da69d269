"""Text <-> token ids: a Hugging Face `tokenizer.json`, or one rebuilt from GGUF metadata.

A GGUF file carries no `tokenizer.json`; it stores the vocabulary, merges and special ids as
metadata under llama.cpp's key names, and names its pre-tokenizer (`tokenizer.ggml.pre`) instead of
spelling it out. We rebuild an equivalent `tokenizers.Tokenizer` from those facts, following
llama.cpp's reading of them (src/llama-vocab.cpp): its list of split regexes per pre-tokenizer name,
its defaults for adding BOS/EOS, and its way of finding end-of-generation tokens. The rebuilt
tokenizer is checked against llama.cpp's own vocab test vectors in tests/test_tokenizer.py.

The GGUF vocabulary rebuild lives in gguf_vocab.py. `IncrementalDetokenizer` (detokenizer.py)
turns a stream of generated ids into text that is safe to send as it comes; it depends on this
module, not the other way round.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterable, Sequence

import tokenizers

from mistralrs_jax.json_files import read_json_object
from mistralrs_jax.loading.gguf import read_gguf_metadata
from mistralrs_jax.loading.gguf_vocab import (
    BPE_PRESETS,
    TOKEN_TYPE_NORMAL,
    byte_level_model,
    end_of_generation_ids,
    gemma4_model,
    id_field,
    register_special_tokens,
    sentencepiece_model,
    wordpiece_model,
)
from mistralrs_jax.errors import (CorruptModelFileError, MistralRsError, ModelLoadError, ModelNotFoundError,
                                  UnsupportedArchitectureError)

logger = logging.getLogger(__name__)

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
        ends = {int(i) for i in eos_token_ids} | end_of_generation_ids({i: t.content for i, t in added.items()})
        if eos_token_id is not None:
            ends.add(eos_token_id)
        self.eos_token_ids: set[int] = ends

    # construction

    @classmethod
    def from_gguf_metadata(cls, fields: dict[str, Any], source: str = "<gguf metadata>") -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes from its metadata (key -> plain Python value).
        Whatever is wrong with the vocabulary comes out as a typed error naming `source`."""
        try:
            return cls._from_gguf_metadata(fields, source)
        except CorruptModelFileError as exc:
            if source in str(exc):
                raise
            raise CorruptModelFileError(f"{source}: {exc}") from exc
        except MistralRsError:
            raise
        except Exception as exc:  # tokenizers raises plain Exception for broken vocabularies and merges
            raise CorruptModelFileError(
                f"{source}: the tokenizer cannot be rebuilt from the GGUF vocabulary ({type(exc).__name__}: {exc}); "
                "the file is corrupt") from exc

    @classmethod
    def _from_gguf_metadata(cls, fields: dict[str, Any], source: str) -> "Tokenizer":
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
            key: id_field(fields, key, n_tokens)
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
            backend = byte_level_model(fields, tokens, token_types, preset)
            add_bos = preset.add_bos
        elif model_type == "llama":
            backend = sentencepiece_model(
                fields, tokens, token_types, bool(fields.get("tokenizer.ggml.add_space_prefix", True))
            )
            add_bos = True
        elif model_type == "gemma4":
            backend = gemma4_model(fields, tokens)
            add_bos = True
        elif model_type == "bert":
            backend = wordpiece_model(fields, tokens)
            # BERT frames text as [CLS] ... [SEP]; llama.cpp treats [CLS] as its BOS and adds [SEP] after.
            bos = ids["cls_token_id"] if ids["cls_token_id"] is not None else bos
            add_bos = True
            if fields.get("tokenizer.ggml.add_sep_token", True) and ids["seperator_token_id"] is not None:
                suffix = [ids["seperator_token_id"]]
        else:
            raise UnsupportedArchitectureError(
                f"{source}: GGUF tokenizer model {model_type!r} is not supported (supported: gpt2, llama, gemma4, bert)"
            )
        register_special_tokens(backend, fields, tokens, token_types)
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
        config = read_json_object(os.path.join(path, "tokenizer_config.json"), missing_ok=True)
        special_map = read_json_object(os.path.join(path, "special_tokens_map.json"), missing_ok=True)
        generation = read_json_object(os.path.join(path, "generation_config.json"), missing_ok=True)

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
    json_file = read_json_object(os.path.join(path, "chat_template.json"), missing_ok=True)
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
