#!/usr/bin/env python3
"""Reference dequantisation for shadowkv's Rust tests, via the `gguf` PyPI package.

  gguf_dequant.py raw TYPE IN OUT N        dequantise the raw blocks of ggml type TYPE
                                           (e.g. Q4_K) in file IN; N is the element count
  gguf_dequant.py tensor MODEL.gguf NAME OUT
                                           dequantise tensor NAME of MODEL.gguf

Both write little-endian f32 to OUT, in ggml memory order (ne[0] fastest).
Needs gguf and numpy: run it with the project's Python, "$(tools/python-env)".
"""
import sys

try:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover
    sys.exit(f"gguf_dequant.py: {e}; run it with the project's Python: \"$(tools/python-env)\" {sys.argv[0]} ...")


def write_f32(values, out, n):
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if values.size != n:
        sys.exit(f"gguf_dequant.py: got {values.size} values, expected {n}")
    values.astype("<f4").tofile(out)


def raw(type_name, inp, out, n):
    qtype = GGMLQuantizationType[type_name]
    data = np.fromfile(inp, dtype=np.uint8)
    write_f32(dequantize(data, qtype), out, int(n))


def tensor(model, name, out):
    reader = GGUFReader(model)
    for t in reader.tensors:
        if t.name == name:
            write_f32(dequantize(t.data, t.tensor_type), out, int(t.n_elements))
            return
    sys.exit(f"gguf_dequant.py: {model}: no tensor named {name}")


def main(argv):
    if len(argv) == 5 and argv[0] == "raw":
        raw(*argv[1:])
    elif len(argv) == 4 and argv[0] == "tensor":
        tensor(*argv[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
