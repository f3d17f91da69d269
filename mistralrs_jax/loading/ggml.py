"""Legacy GGML model files (llama.cpp before GGUF): `ggml`, `ggmf` v1 and `ggjt` v1-v3.

These files hold a LLaMA-architecture model: seven int32 hyperparameters, a vocabulary
(piece bytes + SentencePiece score) and the tensors under llama.cpp's old names, each
tensor's data in the same ggml block layout GGUF uses (from ggjt v3 on; earlier versions
stored Q4_0/Q4_1/Q8_0 differently, so those are refused, as llama.cpp's own converter does).

`GGMLFile` presents such a file as the GGUF file llama.cpp's converter would make of it:
GGUF tensor names, a metadata dict with the `llama.*` and `tokenizer.ggml.*` keys, and the
tensor bytes as views of a memory map (nothing is copied). Everything downstream -- the
model builders, ISQ, the tokenizer rebuild -- then treats it like any GGUF file.

What the format does not store:
- The number of KV heads: read from the K projection's shape (a `gqa` factor, mistral.rs'
  `--gqa`, is checked against it).
- RMSNorm epsilon, RoPE base and context length: LLaMA-2 values (1e-5, 10000, 4096) unless
  a Hugging Face `config.json` is given (llama.cpp's `--model-metadata-dir`).
"""
from __future__ import annotations

import logging
import os
import re
import struct
from typing import Any

import numpy as np

from ..errors import CorruptModelFileError, InvalidRequestError, ModelLoadError, NotSupportedError
from .gguf import GGUFFile, GGUFTensor, open_map

log = logging.getLogger(__name__)

# The file magic is a little-endian uint32, so 'ggjt' reads as b"tjgg" on disk.
FORMATS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}
MAX_VERSION = {"ggml": 0, "ggmf": 1, "ggjt": 3}
GGJT_ALIGNMENT = 32
HYPERPARAMETERS = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
# Block layouts changed in ggjt v2 (all quantized types) and v3 (Q4_0, Q4_1, Q8_0 scales went
# f32 -> f16); a tensor in an older layout would decode to garbage, so it is refused.
V3_ONLY_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q8_1"}
UNQUANTIZED = {"F32", "F16"}

# What llama.cpp's GGUF converter assumes for values a legacy file lacks (LLaMA 2).
DEFAULT_RMS_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_CONTEXT_LENGTH = 4096

# Legacy tensor name -> GGUF name ({i}: layer index).
_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
}
_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")

# Token types as GGUF numbers them.
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
SPIECE_SPACE = "\u2581"


def gguf_tensor_name(legacy: str) -> str | None:
    """`layers.3.attention.wq.weight` -> `blk.3.attn_q.weight`; None for a name llama never had."""
    stem, _, suffix = legacy.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _LAYER_RE.fullmatch(legacy)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def is_ggml_file(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in FORMATS
    except OSError:
        return False


def _vocab_entry(token_id: int, piece: bytes) -> tuple[str, int]:
    """A legacy vocabulary piece as GGUF spells it (the SentencePiece piece) and its type.

    Legacy files stored the text a piece stands for: ' ' where SentencePiece writes U+2581,
    the raw byte for the 256 byte-fallback pieces (ids 3..258), nothing for control pieces.
    Ids 0-2 are <unk>, <s>, </s> in every LLaMA vocabulary.
    """
    if token_id < 3:
        return ("<unk>", "<s>", "</s>")[token_id], (UNKNOWN, CONTROL, CONTROL)[token_id]
    if not piece:
        return "", CONTROL
    if len(piece) == 1 and token_id <= 258:
        return f"<0x{piece[0]:02X}>", BYTE
    return piece.decode("utf-8", errors="replace").replace(" ", SPIECE_SPACE), NORMAL


def _metadata_overrides(config_path: str | None) -> dict[str, Any]:
    """eps / RoPE base / context / KV heads from a Hugging Face config.json, if given."""
    if config_path is None:
        return {}
    from ..json_files import read_json_object
    from ..models.model_config import config_from_hf

    config = config_from_hf(read_json_object(config_path), source=config_path)
    log.info("legacy GGML metadata (eps, RoPE base, context length) from %s", config_path)
    return {"eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
            "context_length": config.max_position_embeddings, "n_kv_head": config.num_kv_heads}


class GGMLFile(GGUFFile):
    """A legacy GGML/GGMF/GGJT LLaMA file, seen as the GGUF file it converts to.

    `gqa`: query heads per KV head (mistral.rs' `--gqa`); None reads it from the tensors.
    `config_path`: a Hugging Face config.json supplying eps, RoPE base and context length.
    """

    def __init__(self, path: str, *, gqa: int | None = None, config_path: str | None = None):
        from ..quant import nbytes, qtype_name

        self.path = os.fspath(path)
        self._map = open_map(self.path)
        try:
            self._read_legacy(gqa, config_path, nbytes, qtype_name)
        except BaseException:
            self.close()  # a refused file leaves no mapping behind
            raise

    def _read_legacy(self, gqa: int | None, config_path: str | None, nbytes, qtype_name) -> None:
        data = self._map
        self.container = FORMATS.get(bytes(data[:4]))
        if self.container is None:
            raise CorruptModelFileError(
                f"{self.path} is not a legacy GGML file (first bytes {bytes(data[:4])!r}; expected the "
                "ggml, ggmf or ggjt magic)")
        try:
            offset, self.version = 4, 0  # the first format had no version field
            if self.container != "ggml":
                self.version = struct.unpack_from("<I", data, 4)[0]
                offset = 8
                if not 1 <= self.version <= MAX_VERSION[self.container]:
                    raise CorruptModelFileError(
                        f"{self.path}: {self.container} version {self.version} is unknown (known: 1-"
                        f"{MAX_VERSION[self.container]})")
            values = struct.unpack_from("<7i", data, offset)
            offset += 28
            self.hyperparameters = dict(zip(HYPERPARAMETERS, values))
            self._check_hyperparameters()
            vocab, offset = self._read_vocab(data, offset, self.hyperparameters["n_vocab"])
            infos = self._read_tensor_table(data, offset, qtype_name, nbytes)
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise CorruptModelFileError(
                f"{self.path}: cannot parse the {self.container} file ({exc}); it is probably truncated or "
                "corrupt") from exc
        self._tensors = {}
        for legacy, name, qtype, shape, start, length in infos:
            if start + length > len(data):
                raise CorruptModelFileError(
                    f"{self.path}: tensor {legacy!r} ends at byte {start + length} but the file has only "
                    f"{len(data)} bytes (truncated download?)")
            raw = np.frombuffer(data, dtype=np.uint8, count=length, offset=start)
            self._tensors[name] = GGUFTensor(name=name, qtype=qtype, shape=shape, data=raw)
        self.metadata = self._gguf_metadata(vocab, gqa, _metadata_overrides(config_path))
        log.info("%s: %s v%d, %d tensors, %d layers, %d KV heads", self.path, self.container, self.version,
                 len(self._tensors), self.hyperparameters["n_layer"],
                 self.metadata["llama.attention.head_count_kv"])

    def _check_hyperparameters(self) -> None:
        """Sizes a LLaMA model can have, before anything is computed or allocated from them."""
        from ..models.model_config import MAX_HEADS, MAX_LAYERS, MAX_WIDTH

        hp = self.hyperparameters
        limits = {"n_embd": MAX_WIDTH, "n_head": MAX_HEADS, "n_layer": MAX_LAYERS, "n_rot": MAX_WIDTH}
        for name, limit in limits.items():
            if not 0 < hp[name] <= limit:
                raise CorruptModelFileError(f"{self.path}: {name} = {hp[name]} is outside 1..{limit}; the file "
                                            "is corrupt")
        if hp["n_embd"] % hp["n_head"]:
            raise CorruptModelFileError(
                f"{self.path}: n_embd {hp['n_embd']} is not a multiple of n_head {hp['n_head']}; the file is corrupt")

    def _read_vocab(self, data, offset: int, n_vocab: int) -> tuple[list[tuple[bytes, float]], int]:
        if not 0 < n_vocab < 1 << 22:
            raise ValueError(f"implausible vocabulary size {n_vocab}")
        has_scores = self.container != "ggml"
        vocab = []
        for _ in range(n_vocab):
            length = struct.unpack_from("<I", data, offset)[0]
            if length > 4096:
                raise ValueError(f"vocabulary entry {len(vocab)} claims {length} bytes")
            piece = bytes(data[offset + 4:offset + 4 + length])
            offset += 4 + length
            score = 0.0
            if has_scores:
                score = struct.unpack_from("<f", data, offset)[0]
                offset += 4
            vocab.append((piece, score))
        return vocab, offset

    def _read_tensor_table(self, data, offset: int, qtype_name, nbytes):
        """[(legacy name, GGUF name, type, numpy shape, data start, data length)]; every header
        is walked (a legacy file has no tensor index: data follows each header)."""
        aligned = self.container == "ggjt"
        infos, size = [], len(data)
        while offset < size:
            n_dims, name_length, type_id = struct.unpack_from("<3i", data, offset)
            if not 1 <= n_dims <= 4 or not 0 < name_length < 4096:
                raise ValueError(f"bad tensor header at byte {offset} ({n_dims} dims, name of {name_length} bytes)")
            dims = struct.unpack_from(f"<{n_dims}i", data, offset + 12)
            if any(d <= 0 for d in dims):
                raise ValueError(f"tensor header at byte {offset} has dimensions {list(dims)}")
            offset += 12 + 4 * n_dims
            legacy = bytes(data[offset:offset + name_length]).decode("utf-8", errors="replace")
            offset += name_length
            if aligned:
                offset = -(-offset // GGJT_ALIGNMENT) * GGJT_ALIGNMENT
            shape = tuple(int(d) for d in reversed(dims))
            try:
                qtype = qtype_name(type_id)
                length = nbytes(qtype, shape)
            except NotSupportedError as exc:
                raise ModelLoadError(f"{self.path}: tensor {legacy!r} has an unsupported type ({exc})") from exc
            self._check_layout(legacy, qtype)
            name = gguf_tensor_name(legacy)
            if name is None:
                raise ModelLoadError(
                    f"{self.path}: tensor {legacy!r} is not part of a LLaMA model; legacy GGML files of other "
                    "architectures are not supported (convert the model to GGUF)")
            infos.append((legacy, name, qtype, shape, offset, length))
            offset += length
        if not infos:
            raise ValueError("the file holds a vocabulary but no tensors")
        return infos

    def _check_layout(self, legacy: str, qtype: str) -> None:
        old = self.container != "ggjt" or self.version == 1
        if (old and qtype not in UNQUANTIZED) or (self.container == "ggjt" and self.version == 2
                                                  and qtype in V3_ONLY_TYPES):
            raise NotSupportedError(
                f"{self.path}: tensor {legacy!r} is {qtype} in a {self.container} v{self.version} file, whose "
                f"{qtype} block layout predates ggjt v3 and is not supported; re-quantize the model from its "
                "original weights (or convert an unquantized legacy file)")

    def _kv_heads(self, gqa: int | None, overrides: dict[str, Any]) -> int:
        hp = self.hyperparameters
        n_head, head_dim = hp["n_head"], hp["n_embd"] // max(hp["n_head"], 1)
        if n_head <= 0 or hp["n_embd"] % n_head:
            raise CorruptModelFileError(f"{self.path}: n_embd {hp['n_embd']} is not a multiple of n_head {n_head}")
        k_rows = self.tensor("blk.0.attn_k.weight").shape[0]
        if k_rows % head_dim:
            raise CorruptModelFileError(
                f"{self.path}: the K projection has {k_rows} rows, not a multiple of the head size {head_dim}")
        found = k_rows // head_dim
        if gqa is not None:
            if gqa < 1 or n_head % gqa:
                raise InvalidRequestError(f"--gqa {gqa} must divide the {n_head} attention heads", param="gqa")
            if n_head // gqa != found:
                raise ModelLoadError(
                    f"{self.path}: --gqa {gqa} means {n_head // gqa} KV heads, but the K projection holds "
                    f"{found} (use --gqa {n_head // found}, or leave it out)")
        declared = overrides.get("n_kv_head")
        if declared is not None and int(declared) != found:
            raise ModelLoadError(
                f"{self.path}: the config.json given says {declared} KV heads, the file's K projection holds {found}")
        return found

    def _gguf_metadata(self, vocab: list[tuple[bytes, float]], gqa: int | None,
                       overrides: dict[str, Any]) -> dict[str, Any]:
        hp = self.hyperparameters
        tokens, types = zip(*(_vocab_entry(i, piece) for i, (piece, _) in enumerate(vocab)))
        arch = "llama"
        return {
            "general.architecture": arch,
            "general.name": os.path.splitext(os.path.basename(self.path))[0],
            "general.file_type": hp["ftype"],
            f"{arch}.vocab_size": hp["n_vocab"],
            f"{arch}.context_length": int(overrides.get("context_length", DEFAULT_CONTEXT_LENGTH)),
            f"{arch}.embedding_length": hp["n_embd"],
            f"{arch}.block_count": hp["n_layer"],
            f"{arch}.feed_forward_length": self.tensor("blk.0.ffn_gate.weight").shape[0],
            f"{arch}.rope.dimension_count": hp["n_rot"],
            f"{arch}.rope.freq_base": float(overrides.get("rope_theta", DEFAULT_ROPE_THETA)),
            f"{arch}.attention.head_count": hp["n_head"],
            f"{arch}.attention.head_count_kv": self._kv_heads(gqa, overrides),
            f"{arch}.attention.layer_norm_rms_epsilon": float(overrides.get("eps", DEFAULT_RMS_NORM_EPS)),
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": list(tokens),
            "tokenizer.ggml.scores": [score for _, score in vocab],
            "tokenizer.ggml.token_type": list(types),
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": True,
        }


def open_model_file(path: str, *, gqa: int | None = None, config_path: str | None = None) -> GGUFFile:
    """A GGUF file, or a legacy GGML file presented as one (see `GGMLFile`)."""
    if is_ggml_file(path):
        return GGMLFile(path, gqa=gqa, config_path=config_path)
    if gqa is not None:
        raise InvalidRequestError(f"--gqa applies to legacy GGML files only; {path} is GGUF "
                                  "(its metadata gives the KV heads)", param="gqa")
    return GGUFFile(path)
