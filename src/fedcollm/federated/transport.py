"""How adapter tensors travel: fp32, fp16, int8 with one fp32 scale per tensor, or int4, int2
and int1 with one fp32 scale per group of values.

The algorithm always works in fp32; `encode` runs just before a message leaves and `decode`
right after one arrives, on both sides. int8 sends each tensor as (int8 values, [scale]) with
scale = max|x| / 127 (symmetric, round to nearest): a quarter of fp32's bytes. int4 packs two
values a byte with one fp32 scale per group of INT4_GROUP values (max|x| / 7 over the group),
the whole adapter in three arrays (packed values, scales, shapes): 0.5625 bytes a value, 14% of
fp32's bytes. Its scales are per group, not per tensor, because 15 levels over a whole tensor
would spend them on its few largest values. int2 (ternary: −1, 0, +1 times a group's scale)
and int1 (the sign times the group's mean |x|) send 2 and 1 bits a value in larger groups,
0.28 and 0.14 bytes a value (7% and 3.5% of fp32's bytes), for runs whose traffic matters more
than each round's precision (results/traffic/ measures what they cost). A lossy transport
encodes changes against the adapter both sides hold, not the adapter itself
(federated/reference.py). Under SecAgg+ a client rounds its change to the transport's
precision and hands SecAgg+ those values in fp32 (int8's and the group-wise modes' per-client
scales cannot be summed): the uplink then carries SecAgg+'s own masked integers, and only the
downlink the transport's encoding.

`federation.transport = "auto"` (the default; `Config.transport_mode` resolves it) is int4,
or fp32 under differential privacy. Sending changes, int4 got the same validation items right
as int8, and int8 as fp32, on every seed measured but for one item (results/traffic/), at 14%
of fp32's bytes; Flower's DP mods clip and noise the arrays as they travel, which only fp32
carries faithfully (the config refuses a lossy transport with DP).
"""

from __future__ import annotations

import numpy as np

MODES = ("fp32", "fp16", "int8", "int4", "int2", "int1")
# Values per scale of the group-wise modes. Each keeps its scales at 1/9 of its bytes (4 bytes
# per group against GROUP·bits/8): int4's 64 is bitsandbytes' default 4-bit block; int2 and
# int1 (128 and 256) need larger groups for the same share, and int1's 256 is what brings the
# default adapter under the 0.06% goal of results/traffic/ (1.125 bits a value).
GROUPS = {"int4": 64, "int2": 128, "int1": 256}
BITS = {"int4": 4, "int2": 2, "int1": 1}
INT4_GROUP = GROUPS["int4"]
# Ternary Weight Networks' threshold (Li & Liu 2016): values below 0.7·mean|x| round to zero.
TERNARY_THRESHOLD = 0.7


def encode(arrays: list[np.ndarray], mode: str) -> list[np.ndarray]:
    if mode == "fp32":
        return [np.asarray(a, dtype=np.float32) for a in arrays]
    if mode == "fp16":
        return [np.asarray(a, dtype=np.float16) for a in arrays]
    if mode in GROUPS:
        return _encode_groups(arrays, mode)
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
    if mode in GROUPS:
        return _decode_groups(arrays, mode)
    if len(arrays) % 2:
        raise ValueError(f"int8 transport needs (values, scale) pairs, got {len(arrays)} arrays")
    out = []
    for i in range(0, len(arrays), 2):
        values, scale = arrays[i], arrays[i + 1]
        if values.dtype != np.int8 or scale.shape != (1,) or not np.issubdtype(scale.dtype, np.floating):
            raise ValueError(f"tensor {i // 2} is not an int8 array with a 1-element float scale")
        out.append(values.astype(np.float32) * np.float32(scale[0]))
    return out


def _quantize(values: np.ndarray, count: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes (0 .. 2^bits − 1) and one scale per group (row) of `values`; `count` (a column)
    holds each group's number of values that are not padding (zeros), so that padding never
    shrinks a group's mean.

    int4: 15 uniform levels, −7..7 times max|x|/7, round to nearest.
    int2: ternary, −1, 0, +1 times the mean |x| of the values above the threshold
          0.7·mean|x| (Ternary Weight Networks' rule, near MSE-optimal for bell-shaped values).
    int1: the sign times mean|x|, the scale that minimises the squared error of sign codes."""
    absolute = np.abs(values)
    if mode == "int4":
        peak = absolute.max(axis=1, keepdims=True)
        scales = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
        return (np.clip(np.rint(values / scales), -7, 7) + 8).astype(np.uint8), scales
    mean_abs = absolute.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    if mode == "int1":
        return (values >= 0).astype(np.uint8), mean_abs.astype(np.float32)
    kept = absolute > TERNARY_THRESHOLD * mean_abs
    scales = (absolute * kept).sum(axis=1, keepdims=True) / np.maximum(kept.sum(axis=1, keepdims=True), 1)
    return (np.sign(values) * kept + 1).astype(np.uint8), scales.astype(np.float32)


def _levels(codes: np.ndarray, mode: str) -> np.ndarray:
    """The inverse of `_quantize`'s codes, before the scale: int4 −7..7, int2 −1..1, int1 ±1."""
    codes = codes.astype(np.int8)
    return {"int4": codes - 8, "int2": codes - 1, "int1": 2 * codes - 1}[mode]


def _encode_groups(arrays: list[np.ndarray], mode: str) -> list[np.ndarray]:
    """[packed uint8 codes, fp32 scale per group, int64 shapes as (ndim, *dims) per tensor].
    Each tensor is padded to whole groups, so no group mixes two tensors' magnitudes (a LoRA A's
    values are far larger than its B's)."""
    group, bits = GROUPS[mode], BITS[mode]
    flats = [np.asarray(a, np.float32).ravel() for a in arrays]
    values = np.concatenate([np.pad(f, (0, -f.size % group)) for f in flats]) if arrays else np.zeros(0, np.float32)
    # values per group: `group`, but fewer in a tensor's last group
    count = np.concatenate([np.minimum(group, f.size - group * np.arange(-(-f.size // group))) for f in flats]) \
        if arrays else np.zeros(0)
    codes, scales = _quantize(values.reshape(-1, group), count.astype(np.float32).reshape(-1, 1), mode)
    per_byte = codes.reshape(-1, 8 // bits)  # a group holds whole bytes: 8 divides each GROUPS
    packed = np.zeros(per_byte.shape[0], np.uint8)
    for j in range(per_byte.shape[1]):  # the first code in the lowest bits
        packed |= per_byte[:, j] << (bits * j)
    shapes = np.array([n for a in arrays for n in (a.ndim, *a.shape)], dtype=np.int64)
    return [packed, scales.ravel(), shapes]


def _decode_groups(arrays: list[np.ndarray], mode: str) -> list[np.ndarray]:
    group, bits = GROUPS[mode], BITS[mode]
    if len(arrays) != 3:
        raise ValueError(f"{mode} transport needs 3 arrays (packed values, scales, shapes), got {len(arrays)}")
    packed, scales, shapes = arrays
    if packed.dtype != np.uint8 or scales.dtype != np.float32 or shapes.dtype != np.int64:
        raise ValueError(f"{mode} arrays arrived as {packed.dtype}, {scales.dtype}, {shapes.dtype}; "
                         "expected uint8, float32, int64")
    if packed.size * (8 // bits) != group * scales.size:
        raise ValueError(f"{mode}: {packed.size} packed bytes do not fit {scales.size} scales of "
                         f"{group} values")
    mask = (1 << bits) - 1
    codes = np.stack([(packed >> (bits * j)) & mask for j in range(8 // bits)], axis=1).ravel()
    values = (_levels(codes, mode).reshape(-1, group) * scales[:, None]).ravel()
    out, at, dims = [], 0, shapes.tolist()
    while dims:
        ndim, dims = dims[0], dims[1:]
        shape, dims = tuple(dims[:ndim]), dims[ndim:]
        size = int(np.prod(shape))
        if len(shape) != ndim or at + size > values.size:
            raise ValueError(f"{mode}: tensor {len(out)} (shape {shape}) does not fit the {values.size} values sent")
        out.append(values[at:at + size].reshape(shape).astype(np.float32))
        at += size + (-size % group)
    if at != values.size:
        raise ValueError(f"{mode}: the shapes cover {at} of the {values.size} values sent")
    return out
