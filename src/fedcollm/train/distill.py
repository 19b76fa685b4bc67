"""Server-side mutual knowledge distillation between the LLM and the SLM on the auxiliary data.

  L = (ce·CE_f + λ·KL(g‖f)) + (ce·CE_g + λ·KL(f‖g))

f = LLM, g = SLM. In each KL term the teacher's logits are detached (computed without grad for
its student), so one backward pass updates both adapters, each only through its own terms.
What the KL compares (distill.level):
- token (default): the next-token distributions at the answer positions, the tokens the CE
  terms supervise. With one tokenizer that is exact (`mutual_kd_step`); with two, the positions
  are aligned and the teacher's top-k carried into the student's vocabulary (train/align.py).
- choice: each model's distribution over the answer choices (softmax of the choices' summed
  log-likelihoods): tokenizer-free, for multiple-choice data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcollm.data.encode import Encoded, collate
from fedcollm.models.logits import answer_logits
from fedcollm.progress import PROGRESS_EVERY, progress_bar
from fedcollm.train.align import VocabMap, align, one_to_one
from fedcollm.train.batches import forward_passes, index_batches, num_batches, on, optimizer, trainable

CROSS_TOP_K = 16  # teacher tokens carried across vocabularies when distill.top_k = 0
PAD_CHOICE = -1e4  # the log-likelihood of a choice a question does not have (softmax weight ~0)


@dataclass(frozen=True)
class AuxSet:
    """The server's auxiliary data as each model sees it."""
    llm: list[Encoded]  # the correct answers, LLM tokenizer (with spans when the tokenizers differ)
    slm: list[Encoded]  # the same with the SLM's tokenizer: the same list when they share one
    llm_pad: int
    slm_pad: int
    llm_choices: list[list[Encoded]] | None = None  # distill.level = choice: every choice
    slm_choices: list[list[Encoded]] | None = None
    answers: tuple[int, ...] | None = None  # index of the correct choice

    @classmethod
    def shared(cls, examples: list[Encoded], pad_id: int) -> AuxSet:
        return cls(examples, examples, pad_id, pad_id)

    @property
    def one_tokenizer(self) -> bool:
        return self.llm is self.slm


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


TERMS = ("ce_llm", "ce_slm", "kl_llm", "kl_slm")


def _combine(ce_f, ce_g, kl_f, kl_g, cfg, weights: dict[str, float] | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss, and its parts detached (0-d tensors on the device: reading them is left to the
    caller, once per many steps, so that the host does not wait for the GPU every step).
    weights: each term's share of its batch, when this is one of several forward passes."""
    if weights is not None:
        ce_f, ce_g, kl_f, kl_g = (t * weights[k] for t, k in zip((ce_f, ce_g, kl_f, kl_g), TERMS))
    loss = cfg.ce_weight * (ce_f + ce_g)
    if cfg.llm_learns_from_slm:
        loss = loss + cfg.kd_lambda * kl_f
    if cfg.slm_learns_from_llm:
        loss = loss + cfg.kd_lambda * kl_g
    return loss, {"ce_llm": ce_f.detach(), "ce_slm": ce_g.detach(), "kl_llm": kl_f.detach(), "kl_slm": kl_g.detach()}


def mutual_kd_step(llm, slm, batch: dict[str, torch.Tensor], cfg, weights=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The FedCoLLM server loss for one batch of a shared tokenizer (not yet backpropagated)."""
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
    return _combine(ce_f, ce_g, kl_f, kl_g, cfg, weights)


def _rows(examples: list[Encoded]) -> list[int]:
    """Where each example's answer rows start in answer_logits' output (rows are example-major)."""
    starts, n = [], 0
    for e in examples:
        starts.append(n)
        n += e.n_target
    return starts


def aligned_kl(student: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor,
               pairs: list[tuple[int, int]], vocab_map: VocabMap, temperature: float, top_k: int) -> torch.Tensor:
    """KL(teacher ‖ student) per student answer row, averaged, × τ², across vocabularies.

    pairs: (teacher row, student row) of positions that align one to one. There the target is the
    teacher's top-k distribution (at τ, renormalized) moved into the student's vocabulary by
    `vocab_map` (mass of teacher tokens that map to one student token adds up); at every other
    student row it is the student's own label.
    """
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    target = torch.zeros_like(log_q)
    target[torch.arange(len(labels)), labels] = 1.0
    if pairs:
        t_rows = torch.tensor([t for t, _ in pairs], device=student.device)
        s_rows = torch.tensor([s for _, s in pairs], device=student.device)
        vals, ids = teacher.detach().float()[t_rows].topk(min(top_k or CROSS_TOP_K, teacher.shape[-1]), dim=-1)
        p = F.softmax(vals / temperature, dim=-1)
        carried = torch.zeros(len(pairs), log_q.shape[-1], device=student.device)
        carried.scatter_add_(1, vocab_map(ids), p)
        target[s_rows] = carried
    kl = (target * (torch.log(target.clamp_min(1e-30)) - log_q)).sum(-1)
    return kl.mean() * temperature**2


def aligned_kd_step(llm, slm, aux: AuxSet, idx: list[int], cfg, device, maps, weights=None) -> tuple[torch.Tensor, dict]:
    """The server loss for one batch when the LLM and the SLM tokenize differently."""
    f_ex, g_ex = [aux.llm[i] for i in idx], [aux.slm[i] for i in idx]
    f_logits, f_labels = answer_logits(llm, on(device, collate(f_ex, aux.llm_pad)))
    g_logits, g_labels = answer_logits(slm, on(device, collate(g_ex, aux.slm_pad)))
    pairs = []  # (LLM row, SLM row) of one-to-one aligned answer positions
    for fe, ge, f0, g0 in zip(f_ex, g_ex, _rows(f_ex), _rows(g_ex)):
        pairs += [(f0 + a, g0 + b) for a, b in one_to_one(align(list(fe.spans), list(ge.spans)))]
    to_slm, to_llm = maps
    ce_f = F.cross_entropy(f_logits.float(), f_labels)
    ce_g = F.cross_entropy(g_logits.float(), g_labels)
    kl_f = aligned_kl(f_logits, f_labels, g_logits, [(g, f) for f, g in pairs], to_llm, cfg.temperature, cfg.top_k)
    kl_g = aligned_kl(g_logits, g_labels, f_logits, pairs, to_slm, cfg.temperature, cfg.top_k)
    return _combine(ce_f, ce_g, kl_f, kl_g, cfg, weights)


def choice_scores(model, choices: list[list[Encoded]], answers: list[int], pad_id: int,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """(questions × choices summed log-likelihoods, with grad; CE of the correct choices' tokens)."""
    flat = [e for cs in choices for e in cs]
    logits, labels = answer_logits(model, on(device, collate(flat, pad_id)))
    logp = -F.cross_entropy(logits.float(), labels, reduction="none")
    per_seq = torch.stack([part.sum() for part in logp.split([e.n_target for e in flat])])
    width = max(len(cs) for cs in choices)
    scores = torch.full((len(choices), width), PAD_CHOICE, device=logp.device)
    correct_rows, k = [], 0
    for q, cs in enumerate(choices):
        scores[q, : len(cs)] = per_seq[k:k + len(cs)]
        start = sum(e.n_target for e in flat[:k + answers[q]])
        correct_rows += range(start, start + cs[answers[q]].n_target)
        k += len(cs)
    return scores, -logp[torch.tensor(correct_rows, device=logp.device)].mean()


def choice_kd_step(llm, slm, aux: AuxSet, idx: list[int], cfg, device, weights=None) -> tuple[torch.Tensor, dict]:
    """The server loss for one batch with distill.level = choice: KL between the two models'
    distributions over each question's choices; CE on the correct choice's tokens."""
    answers = [aux.answers[i] for i in idx]
    f_scores, ce_f = choice_scores(llm, [aux.llm_choices[i] for i in idx], answers, aux.llm_pad, device)
    g_scores, ce_g = choice_scores(slm, [aux.slm_choices[i] for i in idx], answers, aux.slm_pad, device)
    kl_f = kd_kl(f_scores, g_scores, cfg.temperature)  # LLM learns from the SLM
    kl_g = kd_kl(g_scores, f_scores, cfg.temperature)  # SLM learns from the LLM
    return _combine(ce_f, ce_g, kl_f, kl_g, cfg, weights)


def kd_step(llm, slm, aux: AuxSet, idx: list[int], cfg, device, maps=None, weights=None) -> tuple[torch.Tensor, dict]:
    """One batch's (or forward pass's, with weights) loss, for whichever level and tokenizer
    pair the run has."""
    if cfg.level == "choice":
        return choice_kd_step(llm, slm, aux, idx, cfg, device, weights)
    if aux.one_tokenizer:
        return mutual_kd_step(llm, slm, on(device, collate([aux.llm[i] for i in idx], aux.llm_pad)), cfg, weights)
    return aligned_kd_step(llm, slm, aux, idx, cfg, device, maps, weights)


def micro_batch(aux: AuxSet, cfg) -> int:
    """Questions per forward pass: distill.micro_batch_size sequences (0: distill.batch_size).
    Choice-level KD runs every choice of a question through both models with gradients, so
    there a pass holds that many sequences' worth of questions."""
    per_pass = cfg.micro_batch_size or cfg.batch_size
    if cfg.level != "choice" or not aux.llm_choices:
        return per_pass
    return max(1, per_pass // max(len(cs) for cs in aux.llm_choices))


def pass_weights(aux: AuxSet, cfg, part: list[int], idx: list[int]) -> dict[str, float]:
    """Each loss term's share of the batch `idx` that falls in the forward pass `part`, counted
    in what the term averages over: answer tokens of the model that is the student (token
    level); questions for the choice-level KL, the correct choices' tokens for its CE. Weighted
    so, the passes' gradients add up to the whole batch's, however it is cut."""
    def share(count) -> float:
        return sum(count(i) for i in part) / sum(count(i) for i in idx)

    if cfg.level == "choice":
        questions = len(part) / len(idx)
        return {"ce_llm": share(lambda i: aux.llm_choices[i][aux.answers[i]].n_target),
                "ce_slm": share(lambda i: aux.slm_choices[i][aux.answers[i]].n_target),
                "kl_llm": questions, "kl_slm": questions}
    f, g = share(lambda i: aux.llm[i].n_target), share(lambda i: aux.slm[i].n_target)
    return {"ce_llm": f, "kl_llm": f, "ce_slm": g, "kl_slm": g}


def mutual_distill(llm, slm, aux: AuxSet, cfg, *, seed: int, device: torch.device, maps=None,
                   progress: bool = False) -> dict[str, float]:
    """Run cfg.epochs passes of mutual KD over the auxiliary examples; return mean loss parts.

    maps: (LLM → SLM, SLM → LLM) VocabMaps, needed when the tokenizers differ at token level."""
    torch.manual_seed(seed)  # LoRA dropout: the same round gives the same adapters, resumed or not
    llm.train()
    slm.train()
    # One optimizer over both adapters; they share no parameters, so this equals two optimizers.
    # No weight decay: it would move an adapter that no loss term reaches (a switched-off
    # direction with CE off), and the ablations must leave that adapter exactly as it was.
    opt = optimizer(trainable(llm) + trainable(slm), lr=cfg.lr, weight_decay=0.0, device=device)
    sums: dict[str, torch.Tensor] = {}  # on the device, read at the end
    steps = 0
    n = len(aux.llm)
    bar = progress_bar(cfg.epochs * num_batches(n, cfg.batch_size), "server KD", progress)
    micro = micro_batch(aux, cfg)
    for epoch in range(cfg.epochs):
        for idx in index_batches(n, cfg.batch_size, seed + epoch):
            opt.zero_grad(set_to_none=True)
            parts: dict[str, torch.Tensor] = {}
            cut = forward_passes(idx, micro)
            for part in cut:  # gradients accumulate over the passes
                weights = pass_weights(aux, cfg, part, idx) if len(cut) > 1 else None
                loss, got = kd_step(llm, slm, aux, part, cfg, device, maps, weights)
                loss.backward()
                for k, v in got.items():
                    parts[k] = parts.get(k, 0.0) + v
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
            bar.update(1)
            if progress and steps % PROGRESS_EVERY == 0:
                bar.set_postfix(ce_llm=f"{sums['ce_llm'].item() / steps:.3f}",
                                ce_slm=f"{sums['ce_slm'].item() / steps:.3f}")
    bar.close()
    for vocab_map in maps or ():
        vocab_map.save()
    llm.eval()
    slm.eval()
    out = {k: float(v) / max(steps, 1) for k, v in sums.items()}
    out["steps"] = steps
    return out
