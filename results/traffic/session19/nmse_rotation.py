"""Session 19 check: would a random Hadamard rotation (DRIVE/EDEN style) lower the int4/int2/int1
rounding error of this adapter? Reads a finished run's SLM adapter (default: the default run's):

    fedcollm run --out /tmp/default-check && python results/traffic/session19/nmse_rotation.py [RUN_DIR]

Prints, for B and A, the kurtosis of the values and each transport's squared rounding error
relative to the values' (NMSE), plain and with each group rotated first.
(benchmarks/transport_rounding.py scores the rounded adapter instead.)
"""

import sys

import numpy as np
from safetensors.numpy import load_file

from fedcollm.federated import transport


def nmse(values: np.ndarray, back: np.ndarray) -> float:
    return float(np.sum((values - back) ** 2) / np.sum(values ** 2))


def round_trip(values: np.ndarray, mode: str) -> np.ndarray:
    return transport.decode(transport.encode([values.astype(np.float32)], mode), mode)[0]


def hadamard(n: int) -> np.ndarray:
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def plain_and_rotated(arrays: list[np.ndarray], mode: str, rng: np.random.Generator) -> tuple[float, float]:
    """Each tensor rounded on its own (as the transport sends it), and all values in groups of the
    mode's size, each group turned by the same random-sign Hadamard matrix before rounding."""
    plain = transport.decode(transport.encode(arrays, mode), mode)
    flat, back = np.concatenate([a.ravel() for a in arrays]), np.concatenate([p.ravel() for p in plain])
    group = transport.GROUPS[mode]
    h, signs = hadamard(group), rng.choice([-1.0, 1.0], group)
    x = np.pad(flat, (0, -flat.size % group)).reshape(-1, group)
    turned = (round_trip((x * signs) @ h.T, mode) @ h) * signs
    return nmse(flat, back), nmse(x, turned)


def main() -> None:
    run = sys.argv[1] if len(sys.argv) > 1 else "/tmp/default-check"
    state = load_file(f"{run}/adapters/slm/adapter_model.safetensors")
    rng = np.random.default_rng(0)
    for name in ("B", "A"):
        arrays = [v for k, v in state.items() if f"lora_{name}" in k]
        flat = np.concatenate([a.ravel() for a in arrays])
        kurtosis = ((flat - flat.mean()) ** 4).mean() / flat.var() ** 2
        print(name, len(arrays), flat.size, "kurtosis", round(kurtosis, 2))
        for mode in ("int4", "int2", "int1"):
            plain, rotated = plain_and_rotated(arrays, mode, rng)
            print(f"  {mode}: plain {plain:.4f}  rotated(g={transport.GROUPS[mode]}) {rotated:.4f}")


if __name__ == "__main__":
    main()
