"""Server KD step: time and peak memory, full-vocabulary KL vs top-k KL, side by side.

Uses SmolLM2-135M's architecture (30 layers, 49,152-token vocabulary) with random weights, so it
needs no download, and the CPU default's SLM (layers 0-9 + 20-29). Each mode runs in a fresh
process so that peak memory belongs to it alone.

    python benchmarks/kd_step.py [--device cpu|cuda] [--batch 8] [--seq 160] [--answer 8] [--topk 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch


def build(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from fedcollm.models.loading import prune_layers  # noqa: PLC0415
    from fedcollm.models.lora import attach_lora  # noqa: PLC0415

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(cfg).to(device, dtype)
    slm = prune_layers(LlamaForCausalLM(cfg).to(device, dtype), 10, 10)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return attach_lora(llm, 8, 16, 0.05, targets), attach_lora(slm, 8, 16, 0.05, targets)


def child(args) -> dict:
    from fedcollm.data.encode import answer_rows  # noqa: PLC0415
    from fedcollm.train.batches import trainable  # noqa: PLC0415
    from fedcollm.train.distill import mutual_kd_step  # noqa: PLC0415

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm, slm = build(device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -args.answer:] = ids[:, -args.answer:]
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
             "answer_rows": answer_rows(labels).to(device)}
    kd = SimpleNamespace(temperature=2.0, top_k=args.topk if args.mode == "topk" else 0, kd_lambda=1.0,
                         ce_weight=1.0, llm_learns_from_slm=True, slm_learns_from_llm=True)
    opt = torch.optim.AdamW(trainable(llm) + trainable(slm), lr=1e-4)

    def step():
        loss, _ = mutual_kd_step(llm, slm, batch, kd)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"mode": args.mode, "step_s": sorted(times)[len(times) // 2], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_timed_steps_mb": base_rss / 1024}
    if device.type == "cuda":
        out["cuda_peak_over_weights_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--answer", type=int, default=8, help="answer tokens per sequence (where KD applies)")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mode", choices=["full", "topk"])
    args = ap.parse_args()
    if args.mode:  # child process
        print(json.dumps(child(args)))
        return
    res = {}
    for mode in ("full", "topk"):
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        res[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    mem_key = "cuda_peak_over_weights_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    report = {"machine": f"{platform.machine()} cpus={__import__('os').cpu_count()} device={args.device}"
              + (f" {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
              "args": {k: v for k, v in vars(args).items() if k != "mode"}, **res,
              "time_ratio_topk_over_full": res["topk"]["step_s"] / res["full"]["step_s"],
              "memory_ratio_topk_over_full": res["topk"][mem_key] / res["full"][mem_key], "memory_measure": mem_key}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
