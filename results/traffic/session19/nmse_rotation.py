"""Session 19 check: would a random Hadamard rotation (DRIVE/EDEN style) lower int1/int2/int4
rounding error on this adapter? Reads the SLM adapter of the default run:
    fedcollm run --out /tmp/default-check && python results/traffic/session19/nmse_rotation.py
Prints each transport's squared error relative to the tensors' (NMSE), plain and rotated."""
import numpy as np
from safetensors.numpy import load_file
from fedcollm.federated import transport
st = load_file("/tmp/default-check/adapters/slm/adapter_model.safetensors")
Bs = [v for k, v in st.items() if "lora_B" in k]
As = [v for k, v in st.items() if "lora_A" in k]
def nmse(arrs, mode):
    dec = transport.decode(transport.encode(arrs, mode), mode)
    num = sum(float(((a - d) ** 2).sum()) for a, d in zip(arrs, dec)); den = sum(float((a ** 2).sum()) for a in arrs)
    return num / den
def hadamard(n):
    H = np.array([[1.0]])
    while H.shape[0] < n: H = np.block([[H, H], [H, -H]])
    return H / np.sqrt(n)
rng = np.random.default_rng(0)
def rotated(arrs, mode, g):
    H = hadamard(g); s = rng.choice([-1.0, 1.0], g)
    flat = np.concatenate([a.ravel() for a in arrs]); pad = -flat.size % g
    x = np.pad(flat, (0, pad)).reshape(-1, g)
    y = (x * s) @ H.T
    dec = transport.decode(transport.encode([y.astype(np.float32)], mode), mode)[0]
    back = (dec @ H) * s
    return float(((x - back) ** 2).sum() / (x ** 2).sum())
for name, arrs in (("B", Bs), ("A", As)):
    flat = np.concatenate([a.ravel() for a in arrs])
    k = ((flat - flat.mean())**4).mean() / flat.var()**2
    print(name, len(arrs), flat.size, "kurtosis", round(k, 2))
    for mode in ("int4", "int2", "int1"):
        g = transport.GROUPS[mode]
        print(f"  {mode}: plain {nmse(arrs, mode):.4f}  rotated(g={g}) {rotated(arrs, mode, g):.4f}")
