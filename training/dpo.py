"""Direct Preference Optimization (Rafailov et al. 2023) on LoRA/DoRA/QLoRA adapters or full weights.

With pi the policy and ref a frozen reference, for a prompt x, chosen y_w and rejected y_l:
    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    loss = -log sigmoid(beta * h)     (with label smoothing e: -(1-e) log s(beta h) - e log s(-beta h))
The reference is the base with its adapters switched off when training adapters (no second copy in
memory), or a frozen copy of the starting weights for full fine-tuning. Log-probabilities are sums over
the answer's tokens only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora import adapters_disabled
from engine.tokenizer import Tokenizer
from training.distributed import resolve_device
from training.dpo_data import collate_pairs, load_pairs
from training.finetune_config import FinetuneConfig
from training.finetune_loop import FinetuneJob, run_finetune
from training.finetune_model import load_for_finetuning
from training.sft import token_logits
from training.sft_data import IGNORE_INDEX
from training.trainer import Batch, resolve_precision


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over labelled positions: logits [N, T, V], labels [N, T] -> [N] (fp32)."""
    # cross_entropy gives -log p per position (0 where ignored) without keeping a [N, T, V] log-softmax.
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(labels.shape).sum(-1)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Per-pair sigmoid DPO loss [B] and the implicit rewards beta * (log pi - log ref) of each side."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


@dataclass
class DpoObjective:
    """The loss the trainer calls: `reference` None means the model itself with adapters disabled."""

    beta: float
    label_smoothing: float = 0.0
    reference: nn.Module | None = None

    def logps(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) answer log-probabilities [2B] of a chosen-then-rejected batch."""
        policy = sequence_logps(token_logits(model, batch), batch["labels"])
        with torch.no_grad():
            if self.reference is not None:
                ref = sequence_logps(token_logits(self.reference, batch), batch["labels"])
            else:
                with adapters_disabled(model):
                    ref = sequence_logps(token_logits(model, batch), batch["labels"])
        return policy, ref

    def terms(self, model: nn.Module, batch: Batch):
        policy, ref = self.logps(model, batch)
        pc, pr = policy.chunk(2)
        rc, rr = ref.chunk(2)
        return dpo_losses(pc, pr, rc, rr, self.beta, self.label_smoothing)

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        losses, _, _ = self.terms(model, batch)
        return losses.sum()

    def metrics(self, model: nn.Module, micro: list[Batch]) -> dict[str, float]:
        """Validation: mean loss, reward accuracy (chosen reward above rejected) and mean reward margin."""
        losses, margins = [], []
        for batch in micro:
            loss, chosen, rejected = self.terms(model, batch)
            losses.append(loss)
            margins.append(chosen - rejected)
        loss, margin = torch.cat(losses), torch.cat(margins)
        return {"loss": float(loss.mean()), "reward_accuracy": float((margin > 0).float().mean()),
                "reward_margin": float(margin.mean())}


def count_pairs(batch: Batch) -> int:
    return batch["input_ids"].shape[0] // 2


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy (the reference for full-weight DPO)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def run_dpo(cfg: FinetuneConfig) -> dict[str, Any]:
    """DPO-train `cfg.base` on the preference pairs in `cfg.data.path`; writes adapter or model to out_dir."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    tokenizer = Tokenizer.from_dir(cfg.base)
    max_len = cfg.data.seq_len + 1
    pairs = load_pairs(cfg.data.path, tokenizer, max_len)
    val = load_pairs(cfg.data.val_path, tokenizer, max_len) if cfg.data.val_path else []
    if cfg.data.val_fraction and not cfg.data.val_path:
        cut = len(pairs) - max(1, int(len(pairs) * cfg.data.val_fraction))
        pairs, val = pairs[:cut], pairs[cut:]
    if cfg.data.max_examples is not None:
        pairs = pairs[: cfg.data.max_examples]
    prepared = load_for_finetuning(cfg, device, precision.name)
    reference = None if cfg.uses_adapter else frozen_copy(prepared.model)
    objective = DpoObjective(cfg.dpo.beta, cfg.dpo.label_smoothing, reference)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    job = FinetuneJob(cfg=cfg, prepared=prepared, precision=precision, train_set=pairs, val_set=val,
                      collate=lambda b: collate_pairs(b, pad_id), loss_fn=objective, weight_fn=count_pairs,
                      evaluate=objective.metrics, count_tokens=lambda b: int(b["input_ids"].numel()), kind="dpo")
    return run_finetune(job)
