"""Legacy GGML model files for the tests, and llama.cpp's own reader of them.

No GGML file can be downloaded here (no model hub), so the tests write their own from a GGUF
that llama.cpp's `convert_hf_to_gguf.py` made of a tiny transformers checkpoint. The writer
follows the format as llama.cpp's `convert_llama_ggml_to_gguf.py` reads it, and that script
(from the llama-cpp-python sdist) is the reference: `llama_cpp_convert_ggml` turns a written
file back into GGUF, and the tests compare what the engine reads with what llama.cpp reads.

The tensors keep llama.cpp's layout (Q/K rows permuted for RoPE), exactly as legacy files
had them; quantized types come from gguf-py's quantizers (K-quants from ours, which are
byte-identical to llama.cpp's reference C).
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from family_fixtures import DATA_DIR, build_checkpoint, convert_to_gguf, llama_cpp_converter_dir
from _vocab_fixtures import _sdist_path

MAGICS = {"ggml": b"lmgg", "ggmf": b"fmgg", "ggjt": b"tjgg"}
# llama.cpp's legacy "ftype" (the file's dominant type) for each weight type.
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
          "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}
LEGACY_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output",
                "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                "attn_output": "attention.wo", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
                "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
VOCAB_SIZE = 384  # 3 specials + 256 byte-fallback pieces + 125 learned: the LLaMA vocabulary's layout
# Hidden 256 so that every row fills K-quant super-blocks (legacy ggjt v3 files carried K-quants too).
CONFIG = dict(vocab_size=VOCAB_SIZE, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=512, rope_scaling=None, rms_norm_eps=1e-5, rope_theta=10000.0)


def write_byte_fallback_tokenizer(directory: Path) -> None:
    """tokenizer.model: a SentencePiece BPE model with LLaMA's layout (<unk> <s> </s>, then the
    256 byte pieces at ids 3-258), the layout legacy GGML vocabularies assume."""
    import sentencepiece as spm

    text = (DATA_DIR / "english.txt").read_text(encoding="utf-8")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buffer, vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        num_threads=1)
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    for stale in ("tokenizer.json", "tokenizer_config.json"):  # the 128-piece ones build_checkpoint wrote
        (directory / stale).unlink(missing_ok=True)


def build_llama_checkpoint(directory: Path, seed: int = 0, **config_changes) -> Path:
    build_checkpoint("llama3", directory, seed=seed, **{**CONFIG, **config_changes})
    write_byte_fallback_tokenizer(directory)
    return directory


def _legacy_piece(token: str, token_type: int) -> bytes:
    """The bytes a legacy vocabulary stored for a SentencePiece piece (see loading/ggml.py)."""
    if token_type == 6:  # byte piece <0xAB>
        return bytes([int(token[3:5], 16)])
    if token_type == 3:  # control
        return b""
    if token_type == 2:  # unknown: legacy llama.cpp wrote SentencePiece's " \u2047 "
        return " \u2047 ".encode()
    return token.replace("\u2581", " ").encode()


def _quantize(values: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "F32":
        return values.astype("<f4").view(np.uint8)
    if qtype == "F16":
        return values.astype("<f2").view(np.uint8)
    if qtype.endswith("_K"):
        from mistralrs_jax.quant import quantize

        return quantize(values, qtype)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])


def write_ggml(gguf_path: Path, target: Path, *, container: str = "ggjt", version: int = 3,
               weight_type: str = "F32", scores: bool = True, types: dict[str, str] | None = None) -> Path:
    """Write the LLaMA model in `gguf_path` (f32) as a legacy file. Every 2-D weight becomes
    `weight_type` (`types` overrides by GGUF tensor name); norms stay F32."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    fields = reader.fields

    def value(key):
        return fields[key].contents()

    arch = value("general.architecture")
    n_embd, n_head = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    tokens, token_types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    token_scores = value("tokenizer.ggml.scores")
    out = bytearray(MAGICS[container])
    if container != "ggml":
        out += struct.pack("<I", version)
    out += struct.pack("<7i", len(tokens), n_embd, 256, n_head, value(f"{arch}.block_count"), n_embd // n_head,
                       FTYPES[weight_type])
    for token, token_type, score in zip(tokens, token_types, token_scores):
        piece = _legacy_piece(token, token_type)
        out += struct.pack("<I", len(piece)) + piece
        if container != "ggml" and scores:
            out += struct.pack("<f", score)
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        if stem.startswith("blk."):
            _, layer, part = stem.split(".", 2)
            legacy = f"layers.{layer}.{LEGACY_NAMES[part]}.{suffix}"
        else:
            legacy = f"{LEGACY_NAMES[stem]}.{suffix}"
        values = np.asarray(tensor.data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        qtype = "F32" if values.ndim == 1 else (types or {}).get(tensor.name, weight_type)
        data = _quantize(values, qtype)
        dims = list(reversed(values.shape))  # ggml order: the contiguous axis first
        name = legacy.encode()
        out += struct.pack("<3i", len(dims), len(name), int(gguf.GGMLQuantizationType[qtype]))
        out += struct.pack(f"<{len(dims)}i", *dims) + name
        if container == "ggjt":
            out += b"\0" * (-len(out) % 32)
        out += data.tobytes()
    target.write_bytes(bytes(out))
    return target


# The script hands GGUFWriter.add_tensor the file's bytes (uint8) with the tensor's element
# shape, from before gguf-py's writer began reading a uint8 tensor's raw_shape as a byte shape;
# today's writer would shrink every shape (F32 rows to a quarter). This shim passes the byte
# shape the writer now expects; the script's own reading of the GGML file is untouched.
_CONVERT_DRIVER = """
import runpy, sys
script = sys.argv[1]
sys.path.insert(1, script.rsplit("/", 1)[0] + "/gguf-py")
import gguf
from gguf.quants import quant_shape_to_byte_shape
add_tensor = gguf.GGUFWriter.add_tensor
def add_tensor_with_byte_shape(self, name, tensor, raw_shape=None, raw_dtype=None, **kwargs):
    if raw_shape is not None and raw_dtype is not None and tensor.dtype == "uint8":
        raw_shape = quant_shape_to_byte_shape(raw_shape, raw_dtype)
    return add_tensor(self, name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kwargs)
gguf.GGUFWriter.add_tensor = add_tensor_with_byte_shape
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def llama_cpp_convert_ggml(source: Path, target: Path, *options: str) -> Path:
    """llama.cpp's convert_llama_ggml_to_gguf.py (with its own gguf-py) on `source`."""
    root = llama_cpp_converter_dir()
    script = root / "convert_llama_ggml_to_gguf.py"
    if not script.is_file():
        with tarfile.open(_sdist_path(), "r:gz") as archive:
            member = next(m for m in archive if m.name.endswith("/vendor/llama.cpp/convert_llama_ggml_to_gguf.py"))
            handle = archive.extractfile(member)
            assert handle is not None
            script.write_bytes(handle.read())
    command = [sys.executable, "-c", _CONVERT_DRIVER, str(script), "--input", str(source), "--output", str(target),
               *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode != 0 or not target.is_file():
        raise RuntimeError(f"llama.cpp's GGML converter failed on {source}:\n{result.stderr[-4000:]}")
    return target


__all__ = ["CONFIG", "VOCAB_SIZE", "build_llama_checkpoint", "convert_to_gguf", "llama_cpp_convert_ggml",
           "write_ggml"]
