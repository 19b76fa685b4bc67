"""How adapter tensors travel: fp32, fp16, int8 with one fp32 scale per tensor, or int4.

The algorithm always works in fp32; `encode` runs just before a message leaves and `decode`
right after one arrives, on both sides. int8 sends each tensor as (int8 values, [scale]) with
scale = max|x| / 127 (symmetric, round to nearest): a quarter of fp32's bytes. int4 packs two
values a byte with one fp32 scale per group of INT4_GROUP values (max|x| / 7 over the group),
the whole adapter in three arrays (packed values, scales, shapes): 0.5625 bytes a value, 14% of
fp32's bytes. Its scales are per group, not per tensor, because 15 levels over a whole tensor
would spend them on its few largest values. A lossy transport encodes changes against the
adapter both sides hold, not the adapter itself (federated/reference.py). Under SecAgg+ a
client rounds its change to the transport's precision and hands SecAgg+ those values in fp32
(int8's and int4's per-client scales cannot be summed): the uplink then carries SecAgg+'s own
masked integers, and only the downlink the transport's encoding.

`federation.transport = "auto"` (the default; `Config.transport_mode` resolves it) is int4,
or fp32 under differential privacy. Sending changes, int4 got the same validation items right
as int8, and int8 as fp32, on every seed measured but for one item (results/traffic/), at 14%
of fp32's bytes; Flower's DP mods clip and noise the arrays as they travel, which only fp32
carries faithfully (the config refuses a lossy transport with DP).
"""

from __future__ import annotations

import numpy as np

MODES = ("fp32", "fp16", "int8", "int4")
# Values per int4 scale. 64, bitsandbytes' default 4-bit block: smaller groups
# round more finely and send more scales (4 bytes per group: 64 adds 1/16 byte a value).
INT4_GROUP = 64


def encode(arrays: list[np.ndarray], mode: str) -> list[np.ndarray]:
    if mode == "fp32":
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    if mode == "fp16":
        return [np.asarray(a, dtype=np.float16) for a in arrays]
    if mode == "int4":
        return _encode_int4(arrays)
    out = []
    for a in arrays:
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        out += [np.clip(np.rint(a / scale), -127, 127).astype(np.int8), np.array([scale], dtype=np.float32)]
    return out


def decode(arrays: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """fp32 arrays back; ValueError (with the reason) if the wire arrays do not fit `mode`."""
    if mode in ("fp32", "fp16"):
        want = np.float32 if mode == "fp32" else np.float16
        for i, a in enumerate(arrays):
            if a.dtype != want:
                raise ValueError(f"tensor {i} arrived as {a.dtype}, expected {np.dtype(want)} ({mode} transport)")
        return [a.astype(np.float32) for a in arrays]
    if mode == "int4":
        return _decode_int4(arrays)
    if len(arrays) % 2:
        raise ValueError(f"int8 transport needs (values, scale) pairs, got {len(arrays)} arrays")
    out = []
    for i in range(0, len(arrays), 2):
        values, scale = arrays[i], arrays[i + 1]
        if values.dtype != np.int8 or scale.shape != (1,) or not np.issubdtype(scale.dtype, np.floating):
            raise ValueError(f"tensor {i // 2} is not an int8 array with a 1-element float scale")
        out.append(values.astype(np.float32) * np.float32(scale[0]))
    return out


def _encode_int4(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """[packed uint8 values, fp32 scale per group, int64 shapes as (ndim, *dims) per tensor].
    Each tensor is padded to whole groups, so no group mixes two tensors' magnitudes (a LoRA A's
    values are far larger than its B's)."""
    groups = [np.pad(np.asarray(a, np.float32).ravel(), (0, -a.size % INT4_GROUP)).reshape(-1, INT4_GROUP)
              for a in arrays]
    values = np.concatenate(groups) if groups else np.zeros((0, INT4_GROUP), np.float32)
    peak = np.abs(values).max(axis=1, keepdims=True)
    scales = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
    codes = (np.clip(np.rint(values / scales), -7, 7) + 8).astype(np.uint8).ravel()  # 1..15
    packed = codes[0::2] | (codes[1::2] << 4)  # INT4_GROUP is even: codes pair up
    shapes = np.array([n for a in arrays for n in (a.ndim, *a.shape)], dtype=np.int64)
    return [packed, scales.ravel(), shapes]


def _decode_int4(arrays: list[np.ndarray]) -> list[np.ndarray]:
    if len(arrays) != 3:
        raise ValueError(f"int4 transport needs 3 arrays (packed values, scales, shapes), got {len(arrays)}")
    packed, scales, shapes = arrays
    if packed.dtype != np.uint8 or scales.dtype != np.float32 or shapes.dtype != np.int64:
        raise ValueError(f"int4 arrays arrived as {packed.dtype}, {scales.dtype}, {shapes.dtype}; "
                         "expected uint8, float32, int64")
    if 2 * packed.size != INT4_GROUP * scales.size:
        raise ValueError(f"int4: {packed.size} packed bytes do not fit {scales.size} scales of "
                         f"{INT4_GROUP} values")
    codes = np.empty(2 * packed.size, np.int8)
    codes[0::2], codes[1::2] = packed & 15, packed >> 4
    values = ((codes - 8).reshape(-1, INT4_GROUP) * scales[:, None]).ravel()
    out, at, dims = [], 0, shapes.tolist()
    while dims:
        ndim, dims = dims[0], dims[1:]
        shape, dims = tuple(dims[:ndim]), dims[ndim:]
        size = int(np.prod(shape))
        if len(shape) != ndim or at + size > values.size:
            raise ValueError(f"int4: tensor {len(out)} (shape {shape}) does not fit the {values.size} values sent")
        out.append(values[at:at + size].reshape(shape).astype(np.float32))
        at += size + (-size % INT4_GROUP)
    if at != values.size:
        raise ValueError(f"int4: the shapes cover {at} of the {values.size} values sent")
    return out
