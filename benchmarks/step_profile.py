"""Where a training step's time goes: wall time per step against the device's own kernel time
per step and the number of kernel launches, for client SFT and server KD at several batch sizes,
side by side in one run.

A step whose kernel time is a small part of its wall time is bound by the host (Python and
operator dispatch, one launch per small LoRA matmul): a larger batch then costs about the same
wall time per step and the tokens/s grow with it. The default SmolLM2 pair on ARC-Easy.

    python benchmarks/step_profile.py [--device cuda] [--batch-sizes 8,16,32] [--steps 10]
                                      [--out results/bench/step_profile.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def profile(step, steps: int, device) -> dict:
    """Run `step` twice to warm up (timed: with model.compile the first step pays the compile),
    then `steps` times under torch.profiler."""
    import torch  # noqa: PLC0415
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile  # noqa: PLC0415

    cuda = device.type == "cuda"
    warmup_s = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        warmup_s.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events) if cuda else None
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                                                        "cuLaunchKernelEx"))  # the last two: Triton (compiled)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {"first_steps_s": [round(w, 2) for w in warmup_s], "wall_ms_per_step": 1e3 * wall / steps,
            "kernel_ms_per_step": None if kernel_us is None else kernel_us / 1e3 / steps,
            "device_busy": None if kernel_us is None else kernel_us / 1e6 / wall,
            "launches_per_step": launches / steps if cuda else None,
            "top_cpu_ops": [(e.key, round(e.self_cpu_time_total / 1e3 / steps, 2)) for e in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", default="8,16,32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="results/bench/step_profile.json")
    args = p.parse_args()

    import dataclasses  # noqa: PLC0415

    from fedcollm import components  # noqa: PLC0415
    from fedcollm.config import load_config  # noqa: PLC0415
    from fedcollm.data.encode import collate  # noqa: PLC0415
    from fedcollm.train.batches import on, optimizer, trainable  # noqa: PLC0415
    from fedcollm.train.distill import mutual_kd_step  # noqa: PLC0415
    from fedcollm.train.sft import sft_step  # noqa: PLC0415

    cfg = load_config(overrides=[f'model.device="{args.device}"', "data.max_train_examples=0", "data.eval_examples=8",
                                 "run.progress=false", *args.sets])
    device = components.device_of(cfg)
    llm, slm = components.build_llm(cfg), components.build_slm(cfg)
    examples = components.client_examples(cfg, 0)
    pad = components.pad_id(cfg)
    report = {"device": str(device), "dtype": str(components.dtype_of(cfg)), "sets": args.sets, "rows": []}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batch = on(device, collate(examples[:bs], pad))
        tokens = int(batch["attention_mask"].sum())
        opt_slm = optimizer(trainable(slm), lr=1e-4, weight_decay=0.0, device=device)
        opt_kd = optimizer(trainable(llm) + trainable(slm), lr=1e-4, weight_decay=0.0, device=device)
        kd_cfg = dataclasses.replace(cfg.distill, batch_size=bs)

        def client_step():
            sft_step(slm, [batch], opt_slm)

        def kd_step():
            loss, _ = mutual_kd_step(llm, slm, batch, kd_cfg)
            opt_kd.zero_grad(set_to_none=True)
            loss.backward()
            opt_kd.step()

        slm.train()
        llm.train()
        for name, step in (("sft", client_step), ("kd", kd_step)):
            row = {"part": name, "batch_size": bs, "tokens_per_step": tokens, **profile(step, args.steps, device)}
            row["tokens_per_s"] = tokens / row["wall_ms_per_step"] * 1e3
            report["rows"].append(row)
            busy = "–" if row["device_busy"] is None else f"{100 * row['device_busy']:.0f}%"
            print(f"{name} batch {bs}: {row['wall_ms_per_step']:.1f} ms/step wall, kernels "
                  f"{row['kernel_ms_per_step'] or 0:.1f} ms ({busy}), {row['launches_per_step'] or 0:.0f} launches, "
                  f"{row['tokens_per_s']:,.0f} tok/s; warm-up steps {row['first_steps_s']} s; top host ops {row['top_cpu_ops'][:4]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
