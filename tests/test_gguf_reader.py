"""Our GGUF reader against the `gguf` package's GGUFReader on the real SmolLM2 file, and its errors."""
import numpy as np
import pytest

from mistralrs_jax.errors import CorruptModelFileError, ModelLoadError, ModelNotFoundError
from mistralrs_jax.loading.gguf import GGUFFile


def test_tensors_match_gguf_reader(smollm2_gguf_path):
    import gguf

    ours = GGUFFile(smollm2_gguf_path)
    reference = gguf.GGUFReader(smollm2_gguf_path)
    assert ours.tensor_names == [t.name for t in reference.tensors]
    for t in reference.tensors:
        mine = ours.tensor(t.name)
        assert mine.qtype == t.tensor_type.name
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert np.array_equal(mine.data, np.asarray(t.data).view(np.uint8).reshape(-1))
    # dequantization of a Q4_1 and a Q8_0 tensor equals gguf's reference dequantizer
    for name in ("blk.0.attn_q.weight", "token_embd.weight"):
        t = next(x for x in reference.tensors if x.name == name)
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(ours.dequantize(name), expected.reshape(ours.tensor(name).shape))


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        GGUFFile(str(path))


def test_truncated_file_is_named(tmp_path, smollm2_gguf_path):
    data = open(smollm2_gguf_path, "rb").read()
    for cut in (100, len(data) // 2):  # inside the header; inside the tensor data
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptModelFileError, match=f"cut{cut}.gguf"):
            GGUFFile(str(path))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFFile(str(path))
