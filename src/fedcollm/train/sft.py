"""Client-side supervised fine-tuning of the LoRA adapter: causal-LM loss on answer tokens only."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fedcollm import checkpoint
from fedcollm.crash import maybe_kill
from fedcollm.data.encode import Encoded
from fedcollm.models.logits import answer_logits
from fedcollm.progress import PROGRESS_EVERY, progress_bar
from fedcollm.train.batches import batches, num_batches, optimizer, trainable
from fedcollm.train.memory import out_of_memory_advice, training_advice


def sft_step(model, batch: list[dict[str, torch.Tensor]], opt: torch.optim.Optimizer) -> torch.Tensor:
    """One optimizer step on one batch, given as one or more forward passes whose gradients
    accumulate; the loss (mean over the batch's answer tokens), detached and left on the device.

    Each pass's mean is weighted by its share of the batch's answer tokens, so the step is the
    whole batch's token mean however the batch is cut (not the mean of the passes' means)."""
    tokens = sum(len(part["answer_rows"]) for part in batch)  # shapes: known on the host
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=batch[0]["input_ids"].device)
    for part in batch:
        pred, target = answer_logits(model, part)
        loss = F.cross_entropy(pred.float(), target)
        if len(batch) > 1:
            loss = loss * (len(target) / tokens)
        loss.backward()
        total += loss.detach()
    opt.step()
    return total


def sft(model, examples: list[Encoded], *, epochs: int, lr: float, batch_size: int, pad_id: int,
        seed: int, device: torch.device, weight_decay: float = 0.0, progress: bool = False,
        desc: str = "sft", resume: Path | None = None, micro_batch_size: int = 0) -> dict[str, float]:
    """Train the model's trainable (adapter) parameters; return the mean loss and step count.

    micro_batch_size: examples per forward pass (gradient accumulation; 0 = the whole batch).

    resume: a file to continue from after its last complete epoch, rewritten after each epoch
    but the last: a long pass outside a federated run (centralized, standalone) that is cut short,
    by a GPU lease's end say, loses one epoch at most. The continued training equals the
    uninterrupted one: adapter, optimizer, loss sum and RNG state are all kept.

    Out of device memory ends in one OutOfMemory line naming `desc`, the device and the client.*
    settings that give memory back (every caller trains with the client section's settings)."""
    with out_of_memory_advice(f"{desc}: SFT on {device}", training_advice("client", batch_size)):
        return _sft(model, examples, epochs=epochs, lr=lr, batch_size=batch_size, pad_id=pad_id, seed=seed,
                    device=device, weight_decay=weight_decay, progress=progress, desc=desc, resume=resume,
                    micro_batch_size=micro_batch_size)


def _sft(model, examples: list[Encoded], *, epochs: int, lr: float, batch_size: int, pad_id: int, seed: int,
         device: torch.device, weight_decay: float, progress: bool, desc: str, resume: Path | None,
         micro_batch_size: int) -> dict[str, float]:
    model.train()
    params = trainable(model)
    # A fresh optimizer per call: FedAvg clients start each round from the global adapter.
    opt = optimizer(params, lr=lr, weight_decay=weight_decay, device=device)
    # The loss is summed on the device and read once at the end: reading it every step would make
    # the host wait for the GPU, and the GPU then waits for the host to queue the next step.
    total, steps, start = torch.zeros((), device=device), 0, 0
    key = f"sft seed={seed} epochs={epochs} lr={lr} batch={batch_size} wd={weight_decay} examples={len(examples)}"
    state = checkpoint.load_pass(resume, key)
    if state is not None:
        start, steps = state["epoch"], state["steps"]
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        total += state["loss_sum"].to(device)
        _set_rng(state["rng"], device)
        print(f"[fedcollm] {desc}: continuing after epoch {start} of {epochs} ({resume})", flush=True)
    bar = progress_bar(epochs * num_batches(len(examples), batch_size), desc, progress, initial=steps)
    for epoch in range(start, epochs):
        for batch in batches(examples, batch_size, pad_id, seed + epoch, device, micro_batch_size):
            total += sft_step(model, batch, opt)
            steps += 1
            bar.update(1)
            if progress and steps % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{total.item() / steps:.3f}")
        if resume is not None and epoch + 1 < epochs:
            checkpoint.save_pass(resume, key, {"epoch": epoch + 1, "steps": steps, "loss_sum": total,
                                               "params": list(params), "optimizer": opt.state_dict(),
                                               "rng": _get_rng(device)})
            maybe_kill("pass", epoch + 1)  # tests: cut short after this epoch's state is saved
    bar.close()
    model.eval()
    return {"loss": total.item() / max(steps, 1), "steps": steps}


def _get_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """LoRA dropout's RNG state (the CPU's, and the GPU's where it trains)."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)
