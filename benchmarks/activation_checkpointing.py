"""`model.activation_checkpointing`: peak memory and step time of client SFT (the SLM) and server
KD (the LLM and the SLM in one backward), with and without it, side by side in one run; and
whether both arms trained the same adapters (they should, to the bit on a CPU).

SmolLM2-135M's architecture with random weights (no download; benchmarks/kd_step.py's `build`),
LoRA r=8 on all 7 projections with dropout, fixed-length batches of random tokens whose last
`--answer` tokens are the answer. Each phase and arm runs in a fresh process (SFT holds the SLM
alone, as a client does), so a peak belongs to it alone. Memory: the peak over what was held
before the first step (the models; the optimizer state is made in that step), CUDA's allocated
bytes or, on a CPU, the resident set (Linux's high-water mark, reset before the first step;
see CPU_MEMORY_ENV).

    python benchmarks/activation_checkpointing.py [--device cpu|cuda] [--batch 8] [--seq 160] [--steps 3]
    python benchmarks/activation_checkpointing.py --device cuda --batch 32 --seq 256   # the GPU table's shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ARMS = ("off", "on")
PHASES = ("sft", "kd")  # client SFT of the SLM; server KD of both models
# glibc keeps freed blocks of up to 32 MiB for reuse (its mmap threshold grows as such blocks are
# freed), so a CPU process's RSS stays near its earlier peaks and hides what checkpointing frees.
# With blocks over 64 KiB mmap'd and returned on free, RSS follows the live tensors; it slows
# the steps, so on a CPU the time comes from a first process without it, the memory from a second.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _memory_mb(device) -> tuple[float, float]:
    """(now, peak since the last _reset_peak): CUDA's allocated bytes, or this process's resident
    set (Linux: VmRSS and its high-water mark VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _phase(step, steps: int, device) -> dict:
    """One untimed step (allocator, kernels), then `steps` timed ones; the peak memory over them
    all above the memory held when the phase began (models, and the optimizer state after one step)."""
    _reset_peak(device)
    start, _ = _memory_mb(device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_over_start_mb": _memory_mb(device)[1] - start,
            "start_mb": start}


def child(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from kd_step import build  # noqa: PLC0415 - the same pair as the KD benchmark

    from fedcollm.data.encode import answer_rows  # noqa: PLC0415
    from fedcollm.models.compat import checkpoint_activations  # noqa: PLC0415
    from fedcollm.models.lora import adapter_state  # noqa: PLC0415
    from fedcollm.train.batches import optimizer, trainable  # noqa: PLC0415
    from fedcollm.train.distill import mutual_kd_step  # noqa: PLC0415
    from fedcollm.train.sft import sft_step  # noqa: PLC0415

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm, slm = build(device, dtype)
    for model in (llm, slm):
        model.train()
        if args.arm == "on":
            checkpoint_activations(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.config.vocab_size, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer:] = ids[:, -args.answer:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "answer_rows": answer_rows(labels)}
    batch = {k: v.to(device) for k, v in batch.items()}

    torch.manual_seed(1)  # LoRA dropout: the same masks in both arms
    if args.phase == "sft":
        opt = optimizer(trainable(slm), lr=1e-4, weight_decay=0.0, device=device)
        del llm  # the client holds the SLM alone

        def step():
            sft_step(slm, [batch], opt)
    else:
        kd_cfg = SimpleNamespace(temperature=2.0, top_k=0, kd_lambda=1.0, ce_weight=1.0,
                                 llm_learns_from_slm=True, slm_learns_from_llm=True)
        opt = optimizer(trainable(llm) + trainable(slm), lr=1e-4, weight_decay=0.0, device=device)

        def step():
            loss, _ = mutual_kd_step(llm, slm, batch, kd_cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    got = _phase(step, args.steps, device)
    torch.save({"slm": adapter_state(slm)} | ({"llm": adapter_state(llm)} if args.phase == "kd" else {}), args.adapters)
    return {"step_s": round(got["step_s"], 4), "memory_at_start_mb": round(got["start_mb"], 1),
            "peak_over_start_mb": round(got["peak_over_start_mb"], 1)}


def _run(cmd: list[str], env) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[2:])}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _max_abs_diff(a: dict, b: dict) -> float:
    return max((a[m][k].float() - b[m][k].float()).abs().max().item() for m in a for k in a[m])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--answer", type=int, default=8, help="answer tokens per sequence (where the losses apply)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per phase, after one untimed")
    ap.add_argument("--out", default="", help="also write the report here (JSON)")
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # set in the child processes
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(child(args)))
        return
    cuda = args.device.startswith("cuda")
    res, same = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in PHASES:
            adapters = {}
            for arm in ARMS:
                path = os.path.join(tmp, f"{phase}-{arm}.pt")
                cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm, "--phase", phase, "--adapters", path]
                res[f"{phase}_{arm}"] = got = _run(cmd, os.environ)
                adapters[arm] = torch.load(path)
                if not cuda:  # the memory again, with RSS following the live tensors
                    got["peak_over_start_mb"] = _run(cmd, os.environ | CPU_MEMORY_ENV)["peak_over_start_mb"]
            same[f"{phase}_adapters_max_abs_diff"] = _max_abs_diff(adapters["off"], adapters["on"])
    report = {
        "machine": f"{platform.machine()} cpus={os.cpu_count()} device={args.device}"
                   + (f" {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "torch": torch.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("arm", "phase", "adapters", "out")},
        "memory_measure": "CUDA peak allocated" if cuda else f"peak RSS (VmHWM), a second process under {CPU_MEMORY_ENV}",
        **res,
        **{f"{phase}_memory_ratio_on_over_off": round(res[f"{phase}_on"]["peak_over_start_mb"]
                                                      / res[f"{phase}_off"]["peak_over_start_mb"], 3) for phase in PHASES},
        **{f"{phase}_time_ratio_on_over_off": round(res[f"{phase}_on"]["step_s"] / res[f"{phase}_off"]["step_s"], 3)
           for phase in PHASES},
        **same,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
