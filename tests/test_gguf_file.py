"""loading/gguf_file.py reads what gguf-py's GGUFReader reads: every metadata value (same Python type) and every
tensor (name, shape, type and dequantized values), on the default model and on a file with every value type."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize

from errors import UserError
from loading.gguf_file import WHOLE, GGUFError, GGUFFile, dequantize, open_gguf


def same_as_gguf_py(path):
    ours, ref = GGUFFile(path), GGUFReader(path)
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
        if isinstance(value, list) and value:
            assert [type(v) for v in ours.metadata[key]] == [type(v) for v in value], key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(ours.tensors, ref.tensors):
        assert t.ggml_type == r.tensor_type and t.shape == tuple(int(n) for n in reversed(r.shape)), t.name
        want = np.asarray(gguf_dequantize(r.data, r.tensor_type), dtype=np.float32).reshape(t.shape)
        assert np.array_equal(dequantize(t), want), t.name


def test_default_model_reads_as_gguf_py_reads_it(smollm2_gguf):
    same_as_gguf_py(smollm2_gguf)


def test_every_value_type_and_tensor_type(tmp_path):
    path = tmp_path / "all.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60_000)
    writer.add_int16("t.i16", -30_000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve — ünïcödé ✓")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.25])
    writer.add_array("t.strs", ["a", "", "ß c"])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    from gguf.quants import quantize
    for kind in map(GGMLQuantizationType.__getitem__, WHOLE):  # each decoded whole, not by gguf-py's dequantize
        raw = quantize(rng.standard_normal((4, 64)).astype(np.float32), kind)
        writer.add_tensor(kind.name, raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    same_as_gguf_py(path)
    assert GGUFFile(path).metadata["t.str"] == "naïve — ünïcödé ✓"
    assert [t.shape for t in GGUFFile(path).tensors] == [(3, 5), (7,)] + [(4, 64)] * len(WHOLE)


@pytest.mark.parametrize("data, says", [(b"", "empty"), (b"GGUF\x01\x00\x00\x00" + bytes(16), "version 1"),
                                        (b"GGML" + bytes(20), "magic"), (b"GGUF\x03\x00", "damaged or cut short")])
def test_damaged_files_say_what_is_wrong(tmp_path, data, says):
    (path := tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match=says):
        GGUFFile(path)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        open_gguf(path)


def test_a_header_cut_inside_the_vocabulary(tmp_path, smollm2_gguf):
    (path := tmp_path / "cut.gguf").write_bytes(smollm2_gguf.read_bytes()[:500_000])
    with pytest.raises(GGUFError, match="damaged or cut short|past the end"):
        GGUFFile(path)


def test_a_path_that_cannot_be_read_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="not a readable GGUF file"):
        open_gguf(tmp_path)  # a directory
