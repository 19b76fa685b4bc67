"""Client training throughput: 1 client with every core vs 2 clients in parallel with 1 core each.

The simulation gives each Ray actor federation.client_cpus cores and sets torch's threads to
that in fit (client_app.py), so two actors on two cores do not oversubscribe. This measures
what that buys: the same SFT steps of the SLM, samples/s summed over clients, side by side:

  (a) one process, torch threads = all cores, one client after another;
  (b) two processes at once, torch threads = 1 each (what two Ray actors do);
  (c) two processes at once, torch threads = all cores each (oversubscribed: no per-actor setting).

    python benchmarks/client_threads.py [--preset default] [--steps 12] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time


def train(cfg, threads: int, steps: int, seed: int, barrier, out) -> None:
    import torch  # noqa: PLC0415

    from fedcollm import components  # noqa: PLC0415
    from fedcollm.train.sft import sft  # noqa: PLC0415

    torch.set_num_threads(threads)
    part = components.client_examples(cfg, seed % cfg.data.num_clients)
    examples = (part * (1 + steps * cfg.client.batch_size // len(part)))[: steps * cfg.client.batch_size]
    model = components.build_slm(cfg)
    pad = components.pad_id(cfg, "slm")
    sft(model, examples[: cfg.client.batch_size], epochs=1, lr=cfg.client.lr, batch_size=cfg.client.batch_size,
        pad_id=pad, seed=seed, device=components.device_of(cfg))  # warm-up step
    barrier.wait()  # parallel workers start their timed steps together
    t0 = time.perf_counter()
    sft(model, examples, epochs=1, lr=cfg.client.lr, batch_size=cfg.client.batch_size, pad_id=pad, seed=seed,
        device=components.device_of(cfg))
    out.put((seed, time.perf_counter() - t0, len(examples)))


def run(cfg, workers: int, threads: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=train, args=(cfg, threads, steps, s, barrier, out)) for s in range(workers)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[1] for r in results)
    samples = sum(r[2] for r in results)
    return {"workers": workers, "threads_each": threads, "samples": samples, "wall_s": wall,
            "samples_per_s": samples / wall}


def main() -> None:
    from fedcollm.config import load_config  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=12, help="timed optimizer steps per client")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    cfg = load_config(overrides=[*args.overrides, "run.progress=false"], preset=args.preset)
    cores = os.cpu_count() or 1
    # (a) is one worker doing 2× the steps, so all three variants do the same total work.
    one = run(cfg, 1, cores, 2 * args.steps)
    two = run(cfg, 2, 1, args.steps)
    over = run(cfg, 2, cores, args.steps)
    res = {"machine": f"{platform.machine()}, {cores} cores", "preset": args.preset,
           "batch_size": cfg.client.batch_size, "max_length": cfg.data.max_length,
           "one_client_all_cores": one, "two_clients_one_core_each": two, "two_clients_oversubscribed": over,
           "ratio_two_vs_one": two["samples_per_s"] / one["samples_per_s"],
           "ratio_oversubscribed_vs_one": over["samples_per_s"] / one["samples_per_s"]}
    for name in ("one_client_all_cores", "two_clients_one_core_each", "two_clients_oversubscribed"):
        r = res[name]
        print(f"{name:28s} {r['samples']:4d} samples in {r['wall_s']:6.1f} s = {r['samples_per_s']:.2f} samples/s")
    print(f"2 clients × 1 thread / 1 client × {cores} threads: {res['ratio_two_vs_one']:.2f}×; "
          f"oversubscribed / 1 client: {res['ratio_oversubscribed_vs_one']:.2f}×")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
