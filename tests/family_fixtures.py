"""Tiny random-weight checkpoints of every supported family, and their GGUF conversions.

Each checkpoint is built by transformers itself (its config class, its model class,
`save_pretrained`), with weights re-drawn so that nothing is trivially zero (transformers
initialises biases to 0 and norms to 1, which would hide a missing bias or a wrong norm offset)
and logits spread over several units (so greedy decoding has clear winners).

Every config knob must move the logits far above the comparison bound, so nothing sits at
its default: the norm epsilon is NORM_EPS (not 1e-5/1e-6) and the hidden states are kept
small enough for it to matter (embeddings of RMS EMBED_RMS after the family's embedding
scale, residual writers scaled by RESIDUAL_GAIN), and the RoPE bases are ROPE_THETA (and
Gemma 3's GEMMA3_ROPE_THETAS), not 10000 / 1e6. test_mutations.py measures that a 10x
epsilon or a default RoPE base moves logits by far more than the bound. Every checkpoint
has the same tiny SentencePiece tokenizer, trained here on the test prose, saved both as
`tokenizer.model` (what llama.cpp's converter reads) and `tokenizer.json` (what the engine reads).

GGUF files come from llama.cpp's own `convert_hf_to_gguf.py`, taken from the llama-cpp-python
sdist with the gguf-py copy beside it (not PyPI's gguf), all conversions in one subprocess.
"""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from _vocab_fixtures import CACHE_ROOT, LLAMA_CPP_PYTHON_VERSION, ReferenceUnavailable, _sdist_path

DATA_DIR = Path(__file__).parent / "data"
VOCAB_SIZE = 128
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
ROPE_THETA = 25_000.0
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
              bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=UNK_ID, rope_theta=ROPE_THETA)
LM_HEAD_GAIN = 3.0  # logits std ~3: clear greedy winners
NORM_EPS = 1e-2  # of the order of the hidden states' mean square (~0.04-0.3): a 10x error shows
EMBED_RMS = 0.2  # embedding rows' RMS as the first norm sees them (Gemma multiplies by sqrt(hidden))
RESIDUAL_GAIN = 0.3  # o_proj / down_proj and their kin: the residual stream stays small through the layers
RESIDUAL_WRITERS = ("o_proj", "down_proj", "dense", "fc2", "c_proj")
GEMMA3_ROPE_THETAS = {"full_attention": 250_000.0, "sliding_attention": 20_000.0}
# The config key of the norm epsilon, where a family does not call it rms_norm_eps.
NORM_EPS_KEYS = {"PhiConfig": "layer_norm_eps", "Starcoder2Config": "norm_epsilon"}


@dataclass(frozen=True)
class Family:
    config_class: str  # transformers config class
    kwargs: dict
    # What llama.cpp's GGUF cannot carry for this family, as HF config overrides: the GGUF file
    # describes the checkpoint with these changes, so that is the reference it must match.
    gguf_reference_overrides: dict = field(default_factory=dict)
    norm_weights_are_offsets: bool = False  # Gemma stores w for a (1 + w) RMSNorm
    prompt_len: int = 40  # prompt of the greedy comparison (32 new tokens follow)


# llama.cpp's converter writes no RoPE base for Phi-2 and Gemma 1/2, and llama.cpp then takes
# 10000: their GGUF describes the checkpoint with that base.
GGUF_DEFAULT_ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0}}

FAMILIES: dict[str, Family] = {
    # Llama 3.1-style rope scaling; untied head.
    "llama3": Family("LlamaConfig", dict(COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    # Llama 2 shape with linear rope scaling and a tied head.
    "llama2": Family("LlamaConfig", dict(COMMON, num_key_value_heads=HEADS, tie_word_embeddings=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # A window spanning two KV blocks of 16. llama.cpp's llama architecture has no
    # sliding-window key: its GGUF attends to everything.
    "mistral": Family("MistralConfig", dict(COMMON, sliding_window=20),
                      gguf_reference_overrides={"sliding_window": None}),
    "mixtral": Family("MixtralConfig", dict(COMMON, num_local_experts=8, num_experts_per_tok=2)),
    "phi2": Family("PhiConfig", dict(COMMON, num_key_value_heads=HEADS, intermediate_size=4 * HIDDEN,
                                     partial_rotary_factor=0.5),
                   gguf_reference_overrides={"rope_parameters": {**GGUF_DEFAULT_ROPE["rope_parameters"],
                                                                 "partial_rotary_factor": 0.5}}),
    # LongRoPE switches factor sets at 64 tokens. When a sequence grows across that point while
    # decoding, transformers' generate() throws its cache away and recomputes the whole
    # sequence with the long factors; the engine keeps the cached keys (see
    # models/layers.py RotaryEmbedding), so the greedy prompt starts past the switch.
    "phi3": Family("Phi3Config", dict(COMMON, original_max_position_embeddings=64, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(8)],
        "long_factor": [1.5 + 0.25 * i for i in range(8)]}), prompt_len=70),
    "gemma": Family("GemmaConfig", dict(COMMON, head_dim=HEAD_DIM), gguf_reference_overrides=GGUF_DEFAULT_ROPE,
                    norm_weights_are_offsets=True),
    # llama.cpp scales Gemma 2/3 attention by head_dim**-0.5 (hidden/heads for the 27B models),
    # not by query_pre_attn_scalar, which its GGUF does not store.
    "gemma2": Family("Gemma2Config", dict(COMMON, head_dim=HEAD_DIM, sliding_window=8),
                     gguf_reference_overrides={"query_pre_attn_scalar": HEAD_DIM, **GGUF_DEFAULT_ROPE},
                     norm_weights_are_offsets=True),
    # Six layers: llama.cpp's fixed pattern makes every sixth layer global.
    "gemma3": Family("Gemma3TextConfig", dict(COMMON, num_hidden_layers=6, head_dim=HEAD_DIM, sliding_window=8,
                                              rope_parameters={
                                                  "full_attention": {
                                                      "rope_type": "linear", "factor": 4.0,
                                                      "rope_theta": GEMMA3_ROPE_THETAS["full_attention"]},
                                                  "sliding_attention": {
                                                      "rope_type": "default",
                                                      "rope_theta": GEMMA3_ROPE_THETAS["sliding_attention"]}}),
                     gguf_reference_overrides={"query_pre_attn_scalar": HEAD_DIM}, norm_weights_are_offsets=True),
    # YaRN, as Qwen2.5 enables it for long contexts.
    "qwen2": Family("Qwen2Config", dict(COMMON, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 64})),
    # llama.cpp's starcoder2 architecture has no sliding-window key either.
    "starcoder2": Family("Starcoder2Config", dict(COMMON, sliding_window=8),
                         gguf_reference_overrides={"sliding_window": None}),
}


# --------------------------------------------------------------------------- tokenizer


def write_tokenizer(directory: Path) -> None:
    """A 128-piece SentencePiece unigram model as tokenizer.model, tokenizer.json and its config."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    text = (DATA_DIR / "english.txt").read_text(encoding="utf-8")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buffer, vocab_size=VOCAB_SIZE, model_type="unigram",
        character_coverage=1.0, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, minloglevel=2,
        num_threads=1)
    (directory / "tokenizer.model").write_bytes(buffer.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.vocab_size())]
    backend = Tokenizer(models.Unigram(pieces, unk_id=UNK_ID))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))


# --------------------------------------------------------------------------- checkpoints


def _randomize(model, family: Family, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)

    def normal(shape):
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                base = 0.0 if family.norm_weights_are_offsets else 1.0
                param.copy_(base + 0.2 * normal(param.shape))
            elif name.endswith("bias"):
                param.copy_(0.2 * normal(param.shape))
            elif "embed_tokens" in name:
                scale = EMBED_RMS / math.sqrt(param.shape[-1]) if family.norm_weights_are_offsets else EMBED_RMS
                param.copy_(normal(param.shape) * scale)
            else:
                gain = LM_HEAD_GAIN if name.startswith("lm_head") else 1.0
                if any(writer in name for writer in RESIDUAL_WRITERS):
                    gain = RESIDUAL_GAIN
                param.copy_(normal(param.shape) * gain / math.sqrt(param.shape[-1]))


def build_checkpoint(name: str, directory: Path, seed: int = 0, *, dtype: str = "float32",
                     max_shard_size: str | None = None, **config_changes) -> Path:
    """`save_pretrained` of the family's tiny model (safetensors in `dtype`, sharded when
    `max_shard_size` is given) plus the tokenizer files."""
    import torch
    import transformers

    family = FAMILIES[name]
    config = getattr(transformers, family.config_class)(**{norm_eps_key(name): NORM_EPS, **family.kwargs,
                                                            **config_changes})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, family, seed)
    model = model.to(getattr(torch, dtype))
    directory.mkdir(parents=True, exist_ok=True)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **extra)
    write_tokenizer(directory)
    return directory


def require_checkpoint_peers() -> None:
    """What building a checkpoint and its reference needs (skips or, in CI, fails without it)."""
    from peers import require_peer

    for package in ("torch", "transformers", "sentencepiece"):
        require_peer(package)


def norm_eps_key(name: str) -> str:
    """The transformers config key of the family's norm epsilon."""
    return NORM_EPS_KEYS.get(FAMILIES[name].config_class, "rms_norm_eps")


def load_reference(directory: Path, overrides: dict | None = None):
    """The checkpoint in transformers (f32, eager attention), with config overrides."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", **(overrides or {}))
    return model.eval()


def reference_logits(model, token_ids: list[int]):
    import torch

    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float().numpy()


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding (generate, do_sample=False), never stopping at EOS."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=UNK_ID)
    return out[0, len(prompt_ids):].tolist()


# --------------------------------------------------------------------------- llama.cpp's converter

CONVERTER_MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                     "vendor/llama.cpp/gguf-py/")

# Runs in a subprocess: the converter must import its own gguf-py, not the installed gguf.
# Its GPT-2-BPE vocabulary path fingerprints the tokenizer against a list of published ones and
# refuses any other; Phi-2's and Starcoder2's converters take that path, so for them the
# (made-up) test tokenizer goes through the SentencePiece path the other families use. The
# weights, the metadata and the tensor names are untouched by this.
CONVERT_SCRIPT = textwrap.dedent("""
    import json, runpy, sys
    root, jobs = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, root)
    sys.path.insert(0, root + "/gguf-py")
    converter = runpy.run_path(root + "/convert_hf_to_gguf.py")
    from conversion.phi import Phi2Model
    from conversion.starcoder import StarCoder2Model
    for cls in (Phi2Model, StarCoder2Model):
        cls.set_vocab = lambda self: self._set_vocab_sentencepiece()
    for source, target, *options in jobs:
        sys.argv = ["convert_hf_to_gguf.py", source, "--outtype", "f32", "--outfile", target, *options]
        converter["main"]()
""")


def llama_cpp_converter_dir() -> Path:
    """convert_hf_to_gguf.py with its conversion/ package and gguf-py, unpacked once into the cache."""
    target = CACHE_ROOT / f"llama-cpp-converter-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / ".complete").is_file():
        return target
    sdist = _sdist_path()
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            inner = member.name.split("/", 1)[-1]
            if member.isfile() and inner.startswith(CONVERTER_MEMBERS):
                relative = inner[len("vendor/llama.cpp/"):]
                destination = target / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None
                with source:
                    destination.write_bytes(source.read())
    (target / ".complete").write_text(str(sdist))
    return target


def build_all_checkpoints(root: Path) -> dict:
    """{family: checkpoint dir} for every tiny family, built under `root` (fails or skips per the
    skip policy when transformers or torch is missing)."""
    require_checkpoint_peers()
    return {name: build_checkpoint(name, root / name) for name in FAMILIES}


def convert_to_gguf(jobs: list[tuple]) -> None:
    """Convert each (checkpoint dir, .gguf path, *extra converter flags) with llama.cpp's converter,
    f32, all in one process."""
    root = llama_cpp_converter_dir()
    result = subprocess.run(
        [sys.executable, "-c", CONVERT_SCRIPT, str(root), json.dumps([[str(part) for part in job] for job in jobs])],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed:\n{result.stderr[-4000:]}")
    missing = [str(job[1]) for job in jobs if not Path(job[1]).is_file()]
    if missing:
        raise RuntimeError(f"llama.cpp's converter wrote no {missing}:\n{result.stderr[-4000:]}")


__all__ = ["FAMILIES", "ReferenceUnavailable", "build_all_checkpoints", "build_checkpoint", "convert_to_gguf", "load_reference",
           "reference_greedy", "reference_logits", "require_checkpoint_peers", "write_tokenizer"]
