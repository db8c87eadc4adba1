"""Reader and writer of CTranslate2's `model.bin` (binary version 6), written from the format's
description in DESIGN.md section 7: every byte of the file is accounted for, so a truncated,
padded or otherwise changed file is refused instead of half-read."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

BINARY_VERSION = 6

# dtype code -> torch dtype; all little-endian.
DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass
class ModelBin:
    """The content of a model.bin: spec name (e.g. WhisperSpec), spec revision, variables by name
    and aliases (alias -> name of the variable it shares)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        """A variable by name or alias."""
        return self.variables[self.aliases.get(name, name)]


class _Cursor:
    """Reads fields in order from a buffer; running short raises a ValueError with the offset."""

    def __init__(self, buf: bytearray, where: str) -> None:
        self.view = memoryview(buf)
        self.pos = 0
        self.where = where
        self.what = "the header"

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.view):
            raise self.error(f"truncated at byte {len(self.view)} while reading {self.what} "
                             f"(needed {n} bytes at offset {self.pos})")
        chunk = self.view[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("H")
        raw = bytes(self.take(n))
        if n == 0 or raw[-1] != 0:
            raise self.error(f"string at byte {self.pos - n} while reading {self.what} has no trailing NUL")
        return raw[:-1].decode("utf-8")


def read_model_bin(path: str | Path) -> ModelBin:
    """Reads a CTranslate2 model.bin. Raises ValueError naming the file and the problem for a
    bad version, truncation, trailing bytes, an unknown dtype or a byte count that disagrees
    with the shape."""
    path = Path(path)
    size = path.stat().st_size
    buf = bytearray(size)
    with open(path, "rb") as f:
        if f.readinto(buf) != size:
            raise ValueError(f"{path}: file changed size while being read")
    cur = _Cursor(buf, str(path))

    cur.what = "the binary version"
    version = cur.unpack("I")
    if version != BINARY_VERSION:
        raise cur.error(f"binary version {version}, expected {BINARY_VERSION} "
                        "(only CTranslate2's format version 6 is understood)")
    cur.what = "the spec name"
    spec = cur.string()
    cur.what = "the spec revision"
    revision = cur.unpack("I")
    cur.what = "the number of variables"
    count = cur.unpack("I")

    variables: dict[str, torch.Tensor] = {}
    for index in range(count):
        cur.what = f"the name of variable #{index}"
        name = cur.string()
        cur.what = f"variable {name!r}"
        if name in variables:
            raise cur.error(f"variable {name!r} appears twice")
        rank = cur.unpack("B")
        shape = [cur.unpack("I") for _ in range(rank)]
        code = cur.unpack("B")
        if code not in DTYPES:
            raise cur.error(f"variable {name!r} has unknown dtype code {code} (expected one of {sorted(DTYPES)})")
        dtype = DTYPES[code]
        nbytes = cur.unpack("I")
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise cur.error(f"variable {name!r} declares {nbytes} bytes but shape {shape} of {dtype} "
                            f"needs {expected}")
        start = cur.pos
        cur.take(nbytes)
        # One copy per tensor out of the file buffer: aligned, writable, independent of `buf`.
        raw = torch.empty(0, dtype=torch.uint8)
        if nbytes:
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start).clone()
        variables[name] = raw.view(dtype).reshape(shape)

    cur.what = "the number of aliases"
    n_aliases = cur.unpack("I")
    aliases: dict[str, str] = {}
    for index in range(n_aliases):
        cur.what = f"alias #{index}"
        alias = cur.string()
        target = cur.string()
        if target not in variables:
            raise cur.error(f"alias {alias!r} points to {target!r}, which is not a variable of the file")
        aliases[alias] = target
    if cur.pos != size:
        raise cur.error(f"{size - cur.pos} trailing bytes after the aliases (at byte {cur.pos} of {size})")
    return ModelBin(spec=spec, revision=revision, variables=variables, aliases=aliases)


def write_model_bin(path: str | Path, spec: str, revision: int, variables: dict[str, torch.Tensor],
                    aliases: dict[str, str] | None = None) -> None:
    """Writes variables (and aliases) in the same format read_model_bin reads."""

    def string(s: str) -> bytes:
        raw = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with open(path, "wb") as f:
        f.write(struct.pack("<I", BINARY_VERSION) + string(spec) + struct.pack("<II", revision, len(variables)))
        for name, tensor in variables.items():
            if tensor.dtype not in DTYPE_CODES:
                raise ValueError(f"write_model_bin: variable {name!r} has dtype {tensor.dtype}, "
                                 f"expected one of {list(DTYPE_CODES)}")
            t = tensor.detach().cpu().contiguous()
            data = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
            f.write(string(name) + struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape))
            f.write(struct.pack("<BI", DTYPE_CODES[t.dtype], len(data)) + data)
        f.write(struct.pack("<I", len(aliases or {})))
        f.writelines(string(alias) + string(target) for alias, target in (aliases or {}).items())
