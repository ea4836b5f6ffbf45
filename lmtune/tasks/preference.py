"""Preference tuning of task generation (train.objective dpo | orpo): pair rows in TRL's layout, the
reference log-probabilities, and the DPO and ORPO losses.

Why not TRL's DPOTrainer / ORPOTrainer: in trl 1.16 both losses are methods of their Trainer
(DPOTrainer._compute_loss, ORPOTrainer.odds_ratio_loss read self.beta, self.accelerator), reachable only
through a second training loop. lmtune's own loop gives the run its progress bar, early stopping on dev,
checkpoints and best-epoch restore, the run directory, completion-only masking (the LM head runs on the
response tokens alone) and its speed paths, so the two losses are written here, each in a few lines,
following TRL's formulas: DPO's sigmoid loss on summed response log-probs, ORPO's NLL plus odds-ratio
term on length-averaged log-probs (TRL's log1mexp included).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.errors import InputError

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# The defaults of a preference run, one rule for every PEFT method: TRL's default 3 epochs (its
# num_train_epochs, TrainingArguments'), since the pairs are few (lmtune prefer samples at most --max-prompts
# prompts) where SFT's rows are many (its 1 epoch); and 0.3 x the method's SFT learning rate. Adam's step does
# not grow with the loss's gradient, so how far the adapter moves is about lr x steps: 3 epochs at 0.3 x lr move
# it about as far as one SFT epoch at the SFT lr would over the same rows, no further: preference tuning refines
# the SFT model rather than replacing it, and the dev pair loss keeps the best epoch. TRL's own 1e-6 default is
# for full fine-tuning of 7B models; a LoRA adapter starts at zero and needs far larger steps. Before this rule
# (lr 1e-4 and the SFT run's 1 epoch) DialogSum's 199 self-generated pairs moved the DPO loss from 0.693 to
# 0.68 in 25 steps: the model barely changed (bench/generation_control.py, docs/benchmarks.md).
PREFERENCE_EPOCHS = 3
PREFERENCE_GRAD_ACCUM = 2  # micro-batches per optimizer batch: a pair is two sequences (GenerationTask.defaults_for)
PREFERENCE_LR_SCALE = 0.3


def preference_grad_accum(batch_size: int, sft_grad_accum: int = 1) -> int:
    """A preference run's micro-batches per optimizer batch: PREFERENCE_GRAD_ACCUM times the SFT's, since a pair is
    two sequences (the SFT run's peak memory), where the batch has enough rows to split; else the SFT's own."""
    accum = sft_grad_accum * PREFERENCE_GRAD_ACCUM
    return accum if batch_size >= accum else sft_grad_accum


def preference_lr(peft_method: str) -> float | None:
    """The default learning rate of a preference run with this PEFT method (None for full fine-tuning: the
    model-width default of every task)."""
    if peft_method == "none":
        return None
    from lmtune.peft import default_lr
    return PREFERENCE_LR_SCALE * default_lr(peft_method)


def is_pair_row(row: dict) -> bool:
    """A row in TRL's preference layout (any of its columns present: the others are then checked)."""
    return any(c in row for c in PAIR_COLUMNS)


def pair_fields(row: dict, where: str) -> tuple[str | list[dict], str, str]:
    """(prompt, chosen, rejected) of a pair row: the prompt text, or its chat turns (TRL's conversational
    layout: a list of {role, content} ending with the user's); chosen and rejected non-empty text."""
    missing = [c for c in PAIR_COLUMNS if c not in row]
    if missing:
        raise InputError(f"{where}: missing {', '.join(repr(c) for c in missing)}: a preference pair needs prompt, chosen "
                         "and rejected (TRL's layout); `lmtune prefer RUN` writes such a file.")
    prompt = row["prompt"]
    chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                       and m.get("role") in ("system", "user", "assistant") for m in prompt)
    if not chat and not (isinstance(prompt, str) and prompt.strip()):
        raise InputError(f"{where}: 'prompt' must be non-empty text or a list of {{role, content}} turns.")
    if chat and prompt[-1]["role"] != "user":
        raise InputError(f"{where}: a 'prompt' of turns must end with the user's turn.")
    for c in ("chosen", "rejected"):
        if not isinstance(row[c], str) or not row[c].strip():
            raise InputError(f"{where}: '{c}' must be non-empty text (the {'preferred' if c == 'chosen' else 'worse'} output).")
    return prompt, row["chosen"], row["rejected"]


def pair_references(row: dict, chosen: str, where: str) -> list[str]:
    """What a pair's generated output is scored against (the dev metric, the decoding search): the row's own
    `references` (the data's targets; `lmtune prefer` keeps them in its dev pairs, TRL ignores the column),
    else the chosen output."""
    refs = row.get("references")
    if refs is None:
        return [chosen]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise InputError(f"{where}: 'references' must be a non-empty list of non-empty texts (the targets the output is "
                         "scored against), or left out (then chosen is).")
    return list(refs)


def response_log_probs(outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its response tokens (the prompt is masked out) and their count.
    The logits are those of the response positions alone (collate's logits_to_keep)."""
    keep = batch["logits_to_keep"]
    logits = outputs.logits.float().reshape(-1, outputs.logits.size(-1))
    token_logps = -F.cross_entropy(logits, batch["labels"][keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    summed = torch.zeros(keep.shape[0], device=token_logps.device).index_add_(0, rows, token_logps)
    return summed, keep.sum(1).to(summed.dtype)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(objective: str, logps: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                beta: float, orpo_lambda: float, rpo_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair. Rows [0, n) are the chosen outputs, [n, 2n) the
    rejected ones. dpo: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) + rpo_alpha * the chosen output's
    length-averaged NLL (RPO), rewards beta * (pi - ref);
    orpo: NLL(chosen) - lambda * logsigmoid(log-odds(chosen) - log-odds(rejected)) on length-averaged
    log-probs (the ORPO paper, TRL), rewards lambda * the averaged log-probs."""
    n = logps.shape[0] // 2
    avg = logps / counts.clamp(min=1)  # length-averaged log-probs: RPO's NLL term and ORPO's odds
    if objective == "dpo":
        ref = reference.to(logps.dtype)
        chosen, rejected = beta * (logps[:n] - ref[:, 0]), beta * (logps[n:] - ref[:, 1])
        loss = -F.logsigmoid(chosen - rejected)
        if rpo_alpha:  # the DPO loss falls when the chosen log-prob falls less than the rejected one: the NLL keeps it up
            loss = loss - rpo_alpha * avg[:n]
        return loss, chosen.detach(), rejected.detach()
    avg_c, avg_r = avg[:n], avg[n:]
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c.clamp(max=-1e-6)) - log1mexp(avg_r.clamp(max=-1e-6)))
    return -avg_c - orpo_lambda * F.logsigmoid(log_odds), orpo_lambda * avg_c.detach(), orpo_lambda * avg_r.detach()


@torch.inference_mode()
def fill_reference(model: torch.nn.Module, features: list[dict], collate, device: torch.device, batch_size: int = 8, *,
                   adapter_off: bool = False) -> None:
    """Each pair feature's reference log-probs (chosen, rejected), computed once, so no second copy of the
    model is held (TRL's precompute_ref_log_probs). Before training the model as built is the reference;
    a trained run recovers it with adapter_off (peft's disable_adapter, for the methods whose adapter
    starts as the identity: lmtune.peft.can_disable)."""
    from lmtune.training.loop import inputs
    todo = [f for f in features if "reference" not in f]
    if not todo:
        return
    was_training = model.training
    model.eval()
    with model.disable_adapter() if adapter_off else contextlib.nullcontext():
        for i in range(0, len(todo), batch_size):
            part = todo[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(part).items()}
            logps, _ = response_log_probs(model(**inputs(batch)), batch)
            n = len(part)
            for f, c, r in zip(part, logps[:n].tolist(), logps[n:].tolist()):
                f["reference"] = (c, r)
    model.train(was_training)
