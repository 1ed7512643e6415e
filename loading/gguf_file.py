"""A GGUF file's metadata and tensors (llama.cpp's format, versions 2 and 3, little-endian).

gguf-py's GGUFReader makes a numpy view for every value it parses: about 150,000 of them for SmolLM2's 49K-token
vocabulary and merges, seconds before a model can start. This reads the same header in one pass with `struct` and
leaves the tensors in a memory map; gguf-py still dequantizes them (`dequantize`). tests/test_gguf_file.py checks it
against GGUFReader field by field and tensor by tensor."""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from errors import UserError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
         12: "<f8"}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not GGUF, or it ends early, or it holds a value type this reader does not know."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # row-major (torch's order; the file lists the fastest dimension first)
    ggml_type: GGMLQuantizationType
    data: np.ndarray  # its bytes in the map, shaped (*shape[:-1], bytes per row): what gguf's dequantize takes


class GGUFFile:
    """`metadata` (key -> int, float, bool, str or list, in file order) and `tensors` of one GGUF file."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError:  # numpy cannot map an empty file
            raise GGUFError("the file is empty") from None
        self.buf = memoryview(self.map)
        self.pos = 0
        try:
            magic, version, n_tensors, n_keys = self._unpack("<4sIQQ")
            if magic != b"GGUF":
                raise GGUFError("it does not start with the GGUF magic")
            if version not in (2, 3):
                raise GGUFError(f"GGUF version {version} (big-endian or older than 2) is not read here")
            self.metadata = {}
            for _ in range(n_keys):
                key = self._string()
                self.metadata[key] = self._value(self._unpack("<I")[0])
            infos = [self._tensor_info() for _ in range(n_tensors)]
            alignment = int(self.metadata.get("general.alignment", 32))
            start = -(-self.pos // alignment) * alignment
            self.tensors = [self._tensor(start, *info) for info in infos]
        except GGUFError:
            raise
        except (struct.error, UnicodeDecodeError, KeyError, ValueError) as e:
            raise GGUFError(f"its header is damaged or cut short ({type(e).__name__}: {e})") from None

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError("a string runs past the end of the file")
        self.pos += n
        return str(self.buf[self.pos - n:self.pos], "utf-8")

    def _value(self, kind: int):
        if kind in SCALARS:
            return self._unpack(SCALARS[kind])[0]
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            raise GGUFError(f"a value has the unknown type {kind}")
        item, n = self._unpack("<IQ")
        if item in NUMPY:  # numbers in one read
            values = np.frombuffer(self.buf, NUMPY[item], n, self.pos)
            self.pos += values.nbytes
            return values.tolist()
        return [self._value(item) for _ in range(n)]

    def _tensor_info(self) -> tuple:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{n_dims}Q")
        kind, offset = self._unpack("<IQ")
        return name, tuple(reversed(dims)), GGMLQuantizationType(kind), offset

    def _tensor(self, start: int, name: str, shape: tuple, kind, offset: int) -> Tensor:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if shape[-1] % block:
            raise GGUFError(f"tensor {name}'s rows of {shape[-1]} are not whole {kind.name} blocks of {block}")
        rows, row_bytes = int(np.prod(shape[:-1])), shape[-1] // block * block_bytes
        begin = start + offset
        if begin + rows * row_bytes > len(self.map):
            raise GGUFError(f"tensor {name} runs past the end of the file")
        return Tensor(name, shape, kind, self.map[begin:begin + rows * row_bytes].reshape(*shape[:-1], row_bytes))


def open_gguf(path) -> GGUFFile:
    """The parsed file, or a UserError naming the fix (the weights and the tokenizer share one parse)."""
    try:
        return GGUFFile(path)
    except (OSError, GGUFError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e}); download or convert it again.") from None


# Block formats whose whole-tensor decoding gguf-py writes with numpy alone; its own `dequantize` decodes them 16 rows
# at a time, with a Python step per group. The others go through it.
WHOLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
CHUNK = 1 << 16  # blocks decoded at once: bounds the temporaries for a 7B model's embedding


def dequantize(t: Tensor) -> np.ndarray:
    """One tensor as float32 in its shape (a copy: the map stays read-only)."""
    from gguf import quants

    if t.ggml_type.name not in WHOLE:
        return np.array(quants.dequantize(t.data, t.ggml_type), dtype=np.float32).reshape(t.shape)
    block, block_bytes = GGML_QUANT_SIZES[t.ggml_type]
    blocks = t.data.reshape(-1, block_bytes)
    out = np.empty((len(blocks), block), dtype=np.float32)
    decode = getattr(quants, t.ggml_type.name).dequantize_blocks
    for i in range(0, len(blocks), CHUNK):
        out[i:i + CHUNK] = decode(blocks[i:i + CHUNK])
    return out.reshape(t.shape)
