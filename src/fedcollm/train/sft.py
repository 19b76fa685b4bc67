"""Client-side supervised fine-tuning of the LoRA adapter: causal-LM loss on answer tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.data.encode import Encoded
from fedcollm.models.logits import answer_logits
from fedcollm.train.batches import PROGRESS_EVERY, batches, num_batches, optimizer, trainable


def sft_step(model, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> torch.Tensor:
    """One optimizer step on one batch; the loss, detached and left on the device."""
    pred, target = answer_logits(model, batch)
    loss = F.cross_entropy(pred.float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def sft(model, examples: list[Encoded], *, epochs: int, lr: float, batch_size: int, pad_id: int,
        seed: int, device: torch.device, weight_decay: float = 0.0, progress: bool = False,
        desc: str = "sft") -> dict[str, float]:
    """Train the model's trainable (adapter) parameters; return the mean loss and step count."""
    model.train()
    # A fresh optimizer per call: FedAvg clients start each round from the global adapter.
    opt = optimizer(trainable(model), lr=lr, weight_decay=weight_decay, device=device)
    # The loss is summed on the device and read once at the end: reading it every step would make
    # the host wait for the GPU, and the GPU then waits for the host to queue the next step.
    total, steps = torch.zeros((), device=device), 0
    bar = tqdm(total=epochs * num_batches(len(examples), batch_size), desc=desc,
               disable=not progress, leave=False)
    for epoch in range(epochs):
        for batch in batches(examples, batch_size, pad_id, seed + epoch, device):
            total += sft_step(model, batch, opt)
            steps += 1
            bar.update(1)
            if progress and steps % PROGRESS_EVERY == 0:
                bar.set_postfix(loss=f"{total.item() / steps:.3f}")
    bar.close()
    model.eval()
    return {"loss": total.item() / max(steps, 1), "steps": steps}
