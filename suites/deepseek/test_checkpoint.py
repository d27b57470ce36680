"""The lab's weight path without the real weights (issue 12, item 5): a sharded safetensors
checkpoint with an index and NVFP4 weights (E2M1 codes, E4M3 scales per 16 values, a
global scale), written here from seeded weights through the project's NVFP4 quantiser,
then loaded and dequantised by ``kvperf_kernels.models.checkpoint``.

Dequantised weights equal the NVFP4 reference's dequantisation bit for bit, and the
original weights within the lab's NVFP4 bar (cosine >= 0.98); the file format is checked
by hand (header bytes) and, where the ``safetensors`` package is installed, against it.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from kvperf_kernels.models.checkpoint import (
    INDEX_FILE,
    dequantize_nvfp4_weight,
    load_nvfp4_checkpoint,
    load_sharded,
    read_safetensors,
    write_safetensors,
)
from kvperf_kernels.quant.nvfp4 import dequantize_nvfp4_ref, quantize_nvfp4_ref
from kvperf_kernels.testing.compare import same_bytes, same_floats

NVFP4_COSINE_MIN = 0.98  # the lab's NVFP4 round-trip bar
QUANTISED = {"layers.0.attn.wkv.weight": (64, 128), "layers.1.ffn.w1.weight": (32, 64)}
PLAIN = {"layers.0.attn.kv_norm.weight": (512,), "embed.weight": (10, 16)}


def _nvfp4_parts(w: torch.Tensor):
    packed, scale, g = quantize_nvfp4_ref(w)
    return packed, scale, g.reshape(())  # ModelOpt stores weight_scale_2 as a scalar


@pytest.fixture
def checkpoint(tmp_path):
    """(directory, original float32 weights): two shards and an index."""
    gen = torch.Generator().manual_seed(0)
    originals, shards = {}, [{}, {}]
    for i, (name, shape) in enumerate(QUANTISED.items()):
        w = torch.randn(*shape, generator=gen) * torch.exp(torch.randn(shape[1], generator=gen))
        originals[name] = w
        packed, scale, g = _nvfp4_parts(w)
        prefix = name[: -len("weight")]
        shards[i].update({name: packed, prefix + "weight_scale": scale,
                          prefix + "weight_scale_2": g})
    for i, (name, shape) in enumerate(PLAIN.items()):
        originals[name] = torch.randn(*shape, generator=gen).bfloat16()
        shards[i][name] = originals[name]
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(tmp_path / file, tensors, {"format": "pt"})
        weight_map.update({name: file for name in tensors})
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path, originals


def test_nvfp4_checkpoint_loads(checkpoint, kvperf):
    directory, originals = checkpoint
    loaded = load_nvfp4_checkpoint(directory)
    assert set(loaded) == set(originals)
    raw = load_sharded(directory)
    for name in QUANTISED:
        prefix = name[: -len("weight")]
        want = dequantize_nvfp4_ref(raw[name], raw[prefix + "weight_scale"],
                                    raw[prefix + "weight_scale_2"].reshape(1))
        same_floats(loaded[name], want, f"{name} dequantised")
        m = kvperf.errors(loaded[name], originals[name], prefix=f"{name.split('.')[-2]}_")
        assert m["cosine"] >= NVFP4_COSINE_MIN, m
        # bytes: 16 codes in 8 bytes + one E4M3 scale = 9 bytes per 16 values (+ 4 global)
        stored = sum(raw[prefix + s].numel() * raw[prefix + s].element_size()
                     for s in ("weight", "weight_scale", "weight_scale_2"))
        assert stored == originals[name].numel() * 9 // 16 + 4
    for name in PLAIN:
        same_bytes(loaded[name], originals[name], name)


def test_file_format_by_hand(tmp_path):
    """8-byte little-endian header length, JSON with dtype / shape / offsets, then data."""
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float32)
    write_safetensors(tmp_path / "a.safetensors", {"x": t})
    raw = (tmp_path / "a.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header == {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    assert (8 + n) % 8 == 0 and len(raw) == 8 + n + 12
    assert raw[8 + n:] == struct.pack("<3f", 1.0, -2.0, 0.5)
    assert torch.equal(read_safetensors(tmp_path / "a.safetensors")["x"], t)


def test_scalars_round_trip(tmp_path):
    """0-d tensors (ModelOpt's weight_scale_2) write and read back as 0-d, byte for byte,
    and the byte comparison takes them (torch views no 0-d float32 as bytes) and can fail."""
    tensors = {"g": torch.tensor(0.0139), "h": torch.tensor(-2.5, dtype=torch.bfloat16)}
    write_safetensors(tmp_path / "s.safetensors", tensors)
    back = read_safetensors(tmp_path / "s.safetensors")
    for name, t in tensors.items():
        assert back[name].shape == () and back[name].dtype == t.dtype, name
        same_bytes(back[name], t, name)
    with pytest.raises(AssertionError, match=r"g vs 0\.014: \d of 4 bytes differ"):
        same_bytes(back["g"], torch.tensor(0.014), "g vs 0.014")


@pytest.mark.requires("safetensors")
def test_matches_the_safetensors_package(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = checkpoint
    shard = next(directory.glob("model-00001-*.safetensors"))
    theirs = load_file(shard)
    ours = read_safetensors(shard)
    assert set(theirs) == set(ours)
    for name in ours:
        same_bytes(ours[name], theirs[name], f"{name} as safetensors reads it")
    save_file(theirs, tmp_path / "theirs.safetensors")
    for name, t in read_safetensors(tmp_path / "theirs.safetensors").items():
        same_bytes(t, theirs[name], f"{name} written by safetensors")


def test_bad_checkpoints_are_refused(checkpoint):
    directory, _ = checkpoint
    shard = next(directory.glob("model-00002-*.safetensors"))
    good = shard.read_bytes()
    shard.write_bytes(good[:-3])
    with pytest.raises(ValueError, match="offsets .* do not hold"):
        load_sharded(directory)
    shard.write_bytes(struct.pack("<Q", 1 << 40) + good[8:])
    with pytest.raises(ValueError, match="runs past the file"):
        load_sharded(directory)
    shard.write_bytes(good[:5])
    with pytest.raises(ValueError, match="too short for a safetensors header"):
        load_sharded(directory)
    shard.unlink()
    with pytest.raises(ValueError, match="is missing"):
        load_sharded(directory)
    (directory / INDEX_FILE).unlink()
    with pytest.raises(ValueError, match="no index file"):
        load_sharded(directory)
    packed, scale, g = _nvfp4_parts(torch.randn(4, 32))
    with pytest.raises(ValueError, match=r"weight_scale must be float8_e4m3fn \[4, 2\]"):
        dequantize_nvfp4_weight(packed, scale[:, :1], g)
    with pytest.raises(ValueError, match="weight_scale_2 must be one float32"):
        dequantize_nvfp4_weight(packed, scale, g.double())
