"""Sharded safetensors checkpoints with NVFP4 weights (the DeepSeek-V4 release's form),
read with the standard library and torch only.

safetensors file: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": ..}``
(offsets relative to the byte after the header), then the tensors' raw little-endian bytes.
A sharded checkpoint has ``model.safetensors.index.json`` with ``{"weight_map": {name:
shard file}}``.

NVFP4 weight ``W`` [out, in] (NVIDIA ModelOpt's export, as DeepSeek-V4's checkpoints):
``W.weight`` uint8 [out, in / 2] (two E2M1 codes per byte, element 2k in the low nibble),
``W.weight_scale`` float8_e4m3fn [out, in / 16] (one per 16 values) and
``W.weight_scale_2`` float32 [] (the global decode scale):
``w = e2m1(code) * float(weight_scale) * weight_scale_2``.

Every malformed input is a ValueError naming the file and tensor: a truncated file, a
header past the file, offsets outside the data or not matching dtype x shape, an unknown
dtype, an index naming a missing shard or tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 << 20

# E2M1 magnitudes by 3-bit code (bit 3: sign), from the OCP MX specification
E2M1_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    """Write tensors (contiguous copies, CPU) as one safetensors file."""
    header, blobs, at = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def read_header(path) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset of the data) of a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n} runs past the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not JSON ({e})") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, h in header.items():
        if h.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {h.get('dtype')!r}")
        begin, end = h["data_offsets"]
        want = math.prod(h["shape"]) * torch.empty(0, dtype=DTYPES[h["dtype"]]).element_size()
        if not (0 <= begin <= end <= data) or end - begin != want:
            raise ValueError(f"{path}: tensor {name!r} offsets {begin}..{end} do not hold "
                             f"{h['dtype']} {h['shape']} ({want} bytes) inside the "
                             f"{data}-byte data section")
    return header, 8 + n


def read_safetensors(path, names=None) -> dict[str, torch.Tensor]:
    """The file's tensors (or the named ones) as CPU tensors."""
    header, start = read_header(path)
    wanted = header if names is None else names
    out = {}
    with open(path, "rb") as f:
        for name in wanted:
            if name not in header:
                raise ValueError(f"{path}: no tensor {name!r}")
            h = header[name]
            begin, end = h["data_offsets"]
            f.seek(start + begin)
            raw = bytearray(f.read(end - begin))
            t = (torch.frombuffer(raw, dtype=torch.uint8) if raw
                 else torch.empty(0, dtype=torch.uint8))
            out[name] = t.view(DTYPES[h["dtype"]]).reshape(h["shape"])
    return out


def load_sharded(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint through its index (each shard read once)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except FileNotFoundError:
        raise ValueError(f"{index_path}: no index file") from None
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_path}: not a safetensors index ({e})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    out = {}
    for shard, names in sorted(by_shard.items()):
        path = directory / shard
        if not path.is_file():
            raise ValueError(f"{index_path}: shard {shard!r} (holding {names[0]!r}) is missing")
        out.update(read_safetensors(path, names))
    return out


def dequantize_nvfp4_weight(packed: torch.Tensor, scale: torch.Tensor,
                            global_scale: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """float32 [out, in] from ModelOpt NVFP4 parts (module doc)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{what}: packed NVFP4 weight must be uint8 [out, in/2], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (rows, cols // 16):
        raise ValueError(f"{what}: weight_scale must be float8_e4m3fn [{rows}, {cols // 16}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if global_scale.numel() != 1 or global_scale.dtype != torch.float32:
        raise ValueError(f"{what}: weight_scale_2 must be one float32, got "
                         f"{global_scale.dtype} {tuple(global_scale.shape)}")
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(rows, cols).long()
    table = torch.tensor(E2M1_TABLE, dtype=torch.float32)
    mag = table[codes & 7]
    values = torch.where(codes >= 8, -mag, mag)
    block = scale.float().repeat_interleave(16, dim=1)
    return values * block * global_scale.float().reshape(())


def load_nvfp4_checkpoint(directory) -> dict[str, torch.Tensor]:
    """A sharded checkpoint with NVFP4 weights dequantised to float32: ``X.weight`` of every
    (weight, weight_scale, weight_scale_2) triple, the other tensors as stored."""
    raw = load_sharded(directory)
    out = {}
    for name, t in raw.items():
        if name.endswith((".weight_scale", ".weight_scale_2")):
            base = name.rsplit(".", 1)[0] + ".weight"
            if base not in raw:
                raise ValueError(f"{directory}: {name} has no {base}")
            continue
        prefix = name[: -len("weight")] if name.endswith(".weight") else None
        if prefix is not None and prefix + "weight_scale" in raw:
            if prefix + "weight_scale_2" not in raw:
                raise ValueError(f"{directory}: {name} has weight_scale but no weight_scale_2")
            out[name] = dequantize_nvfp4_weight(t, raw[prefix + "weight_scale"],
                                                raw[prefix + "weight_scale_2"], name)
        else:
            out[name] = t
    return out
