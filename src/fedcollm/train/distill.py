"""Server-side mutual knowledge distillation between the LLM and the SLM on the auxiliary data.

  L = (ce·CE_f + λ·KL(g‖f)) + (ce·CE_g + λ·KL(f‖g))

f = LLM, g = SLM. In each KL term the teacher's logits are detached (computed without grad for
its student), so one backward pass updates both adapters, each only through its own terms.
KD is taken on the answer positions, the same tokens the CE terms supervise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedcollm.data.encode import Encoded
from fedcollm.models.logits import answer_logits
from fedcollm.train.batches import batches, num_batches, trainable


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) at temperature τ, scaled by τ² (Hinton).

    With top_k > 0 both distributions are restricted to the teacher's k largest logits and
    renormalized there: a memory saver for large vocabularies.
    """
    teacher = teacher.detach().float()
    student = student.float()
    if top_k:
        idx = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1).indices
        teacher, student = teacher.gather(-1, idx), student.gather(-1, idx)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    log_s = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def mutual_kd_step(llm, slm, batch: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """The FedCoLLM server loss for one batch (not yet backpropagated) and its parts."""
    # Each model runs forward once; its logits serve as student (with grad) in its own terms and,
    # detached, as teacher in the other model's terms.
    f_logits, labels = answer_logits(llm, batch)
    g_logits, _ = answer_logits(slm, batch)
    vocab = min(f_logits.shape[-1], g_logits.shape[-1])  # embeddings may be padded differently
    f_logits, g_logits = f_logits[:, :vocab], g_logits[:, :vocab]
    ce_f = F.cross_entropy(f_logits.float(), labels)
    ce_g = F.cross_entropy(g_logits.float(), labels)
    kl_f = kd_kl(f_logits, g_logits, cfg.temperature, cfg.top_k)  # LLM learns from the SLM
    kl_g = kd_kl(g_logits, f_logits, cfg.temperature, cfg.top_k)  # SLM learns from the LLM
    loss = cfg.ce_weight * (ce_f + ce_g)
    if cfg.llm_learns_from_slm:
        loss = loss + cfg.kd_lambda * kl_f
    if cfg.slm_learns_from_llm:
        loss = loss + cfg.kd_lambda * kl_g
    parts = {"ce_llm": ce_f.item(), "ce_slm": ce_g.item(), "kl_llm": kl_f.item(), "kl_slm": kl_g.item()}
    return loss, parts


def mutual_distill(llm, slm, examples: list[Encoded], cfg, *, pad_id: int, seed: int,
                   device: torch.device, progress: bool = False) -> dict[str, float]:
    """Run cfg.epochs passes of mutual KD over the auxiliary examples; return mean loss parts."""
    torch.manual_seed(seed)  # LoRA dropout: the same round gives the same adapters, resumed or not
    llm.train()
    slm.train()
    # One optimizer over both adapters; they share no parameters, so this equals two optimizers.
    # No weight decay: it would move an adapter that no loss term reaches (a switched-off
    # direction with CE off), and the ablations must leave that adapter exactly as it was.
    opt = torch.optim.AdamW(trainable(llm) + trainable(slm), lr=cfg.lr, weight_decay=0.0)
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(total=cfg.epochs * num_batches(len(examples), cfg.batch_size), desc="server KD",
               disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        for batch in batches(examples, cfg.batch_size, pad_id, seed + epoch, device):
            loss, parts = mutual_kd_step(llm, slm, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            bar.update(1)
            bar.set_postfix(ce_llm=f"{parts['ce_llm']:.3f}", ce_slm=f"{parts['ce_slm']:.3f}")
    bar.close()
    llm.eval()
    slm.eval()
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    out["steps"] = steps
    return out
