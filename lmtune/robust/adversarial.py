"""Adversarial training: on the embedding layer (FGM, PGD, FreeLB) and on the words themselves
(worst-of-k typos or synonym substitutions, WordAdversary at the end of this file).

Written here rather than taken from a library because none of the maintained ones plugs into a
training loop: each is a few lines around the step. We perturb the *output* of the word-embedding
layer through a forward hook (a delta tensor added to it) instead of editing the embedding weights
in place as the usual FGM snippets do: the weights are never touched, so nothing has to be
"restored", it works when the embeddings are frozen (PEFT, model.freeze_embeddings), and each
example gets its own perturbation, normalized over its real (non-padding) tokens.
"""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmtune.config import AdversarialConfig
from lmtune.robust.attack import perturb

@dataclass
class AdversaryInputs:
    """What the recipe hands a registered adversary's `build` (lmtune.registrations, adversaries)."""
    cfg: Any  # lmtune.config.Config
    task: Any
    tokenizer: Any
    labels: list[str]
    train: Any  # Encoded train split
    extra: Any  # Encoded augmented rows, or []
    features: list[dict]  # what the loop trains on (train, re-sampled, plus the augmented rows)
    collate: Callable
    synonyms: Any = None


PASSES = {"fgm": lambda steps: 2, "pgd": lambda steps: steps + 1, "freelb": lambda steps: steps}


def _per_example_norm(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (t * mask).flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


class EmbeddingAdversary:
    """`step` replaces the plain forward/backward of one micro-batch: it leaves in .grad the
    gradients of the clean loss plus the adversarial loss (FGM, PGD) or of the averaged adversarial
    losses (FreeLB), and returns the clean loss (FreeLB: the loss at its small random start)."""

    def __init__(self, cfg: AdversarialConfig, seed: int = 0):
        self.method, self.epsilon, self.alpha, self.steps = cfg.method, cfg.epsilon, cfg.alpha, cfg.steps
        self.passes = PASSES[self.method](self.steps)
        self.generator = torch.Generator().manual_seed(seed)
        self.forward_only = 0  # passes without a backward (WordAdversary's candidate scoring)
        self._delta: torch.Tensor | None = None
        self.last_losses: list[float] = []  # clean, then each adversarial loss of the last step (tests, logs)

    @classmethod
    def build(cls, inputs: AdversaryInputs) -> EmbeddingAdversary:
        return cls(inputs.cfg.adversarial, inputs.cfg.train.seed)

    def describe(self) -> dict:
        """The settings and cost for the run's summary."""
        return {"method": self.method, "forward_backward_passes_per_step": self.passes, "forward_only_passes_per_step": 0,
                "epsilon": self.epsilon, "alpha": self.alpha, "steps": self.steps}

    @contextmanager
    def _perturbed(self, model):
        """While active, the word-embedding output gets self._delta added (created as zeros on first use)."""
        def hook(module, args, output):
            if self._delta is None or self._delta.shape != output.shape:
                self._delta = torch.zeros_like(output, dtype=torch.float32, requires_grad=True)
            return output + self._delta.to(output.dtype)
        handle = _embedding_module(model).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, model, batch, loss_fn, delta):
        self._delta = delta
        with self._perturbed(model):
            loss = loss_fn(model, batch)
        return loss, self._delta

    def step(self, model, batch: dict, loss_fn: Callable, backward: Callable[[torch.Tensor], None],
             no_sync: Callable = nullcontext, items: list[dict] | None = None) -> torch.Tensor:
        """loss_fn(model, batch) -> summed loss; backward(loss) scales and back-propagates it (the
        loop's accelerator.backward); passes whose parameter gradients are not wanted run under
        no_sync so DDP all-reduces once per micro-batch. items (the batch's features) is unused here."""
        mask = batch["attention_mask"].unsqueeze(-1).float() if "attention_mask" in batch else None
        self.last_losses = []
        if self.method == "freelb":
            return self._freelb(model, batch, loss_fn, backward, mask)
        with no_sync():
            clean, delta = self._forward(model, batch, loss_fn, None)
            backward(clean)
        self.last_losses.append(float(clean.detach()))
        mask = mask if mask is not None else torch.ones_like(delta[..., :1])
        grad = delta.grad.detach()
        delta = torch.zeros_like(grad)
        steps = 1 if self.method == "fgm" else self.steps
        step_size = self.epsilon if self.method == "fgm" else self.alpha
        for t in range(steps):
            delta = delta + step_size * grad * mask / _per_example_norm(grad, mask)
            norm = _per_example_norm(delta, mask)
            delta = torch.where(norm > self.epsilon, delta * self.epsilon / norm, delta).detach().requires_grad_(True)
            last = t == steps - 1
            with nullcontext() if last else no_sync():
                adv, delta = self._forward(model, batch, loss_fn, delta)
                if last:
                    backward(adv)
                else:  # only the direction of the next step: no parameter gradients
                    grad = torch.autograd.grad(adv, delta)[0].detach()
            self.last_losses.append(float(adv.detach()))
        self._delta = None
        return clean

    def _freelb(self, model, batch, loss_fn, backward, mask) -> torch.Tensor:
        """Zhu et al. 2020: K ascent steps on delta from a small random start; the parameter gradients
        of all K perturbed losses are averaged ("free" adversarial training)."""
        first = None
        delta = None
        for t in range(self.steps):
            loss, delta = self._forward(model, batch, loss_fn, delta if delta is not None else self._random_start(model, batch, mask))
            backward(loss / self.steps)
            self.last_losses.append(float(loss.detach()))
            first = loss if first is None else first
            if t < self.steps - 1:
                m = mask if mask is not None else torch.ones_like(delta[..., :1])
                grad = delta.grad.detach()
                delta = delta.detach() + self.alpha * grad * m / _per_example_norm(grad, m)
                if self.epsilon > 0:
                    norm = _per_example_norm(delta, m)
                    delta = torch.where(norm > self.epsilon, delta * self.epsilon / norm, delta)
                delta = delta.requires_grad_(True)
        self._delta = None
        return first

    def _random_start(self, model, batch, mask) -> torch.Tensor:
        emb = _embedding_module(model)
        ids = batch["input_ids"]
        shape = (*ids.shape, emb.weight.shape[1])
        u = (torch.rand(shape, generator=self.generator) * 2 - 1).to(emb.weight.device)
        m = mask if mask is not None else torch.ones_like(u[..., :1])
        return (u * m * self.alpha / _per_example_norm(u, m)).requires_grad_(True)


def _embedding_module(model) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return inner.get_input_embeddings()


def example_losses(outputs, batch: dict) -> torch.Tensor:
    """Cross-entropy on the gold labels summed per example, shape [batch]; -100 labels are ignored
    (Task.example_losses' default: heads whose `logits` and `labels` share their leading dimensions)."""
    logits, labels = outputs.logits.float(), batch["labels"]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none", ignore_index=-100)
    return ce.view(labels.shape[0], -1).sum(1)


class WordAdversary:
    """Discrete adversarial training, worst-of-k (Pruthi et al. 2019, "Combating adversarial
    misspellings"): for every training example of a micro-batch, `candidates` random typo (or
    synonym) versions are drawn under the attacks' rules (a share of the words, protected words
    untouched), the model scores them in eval mode without gradients, and the one with the
    highest loss is trained on next to the clean example (clean loss + adversarial loss, as FGM).

    Why, next to FGM/PGD: a misspelt word is a different sub-word sequence, not a small step in
    embedding space, so embedding-space training does not make a model typo-robust (bench/robust.py
    measured FGM and PGD *raising* the typo drop); training on the inputs the attack makes does.

    sources[k] = (example, window number) of features[k]; encode(examples) -> Encoded. The
    perturbations are fresh every step and reproducible from the seed (not across a resume)."""

    def __init__(self, cfg: AdversarialConfig, features: list[dict], sources: list[tuple[object, int]],
                 encode: Callable, collate: Callable, synonyms=None, seed: int = 0):
        self.method, self.rate, self.candidates = cfg.method, cfg.rate, cfg.candidates
        self.source = {id(f): (k, *src) for k, (f, src) in enumerate(zip(features, sources))}
        self.encode, self.collate, self.synonyms, self.seed = encode, collate, synonyms, seed
        self.passes, self.forward_only = 2, cfg.candidates
        self.calls = 0
        self.example_losses = example_losses  # the task's, when built by build()
        self.last_losses: list[float] = []
        self.last_chosen: list[dict] = []  # the features trained on at the last step (tests, logs)

    @classmethod
    def build(cls, inputs: AdversaryInputs) -> WordAdversary:
        from lmtune.tasks.base import encode_examples
        sources = {}  # id(feature) -> (example, window number), over train and its augmented rows
        for enc in [inputs.train, *([inputs.extra] if inputs.extra else [])]:
            for ex, windows in zip(enc.examples, enc.windows()):
                sources.update({id(f): (ex, w) for w, f in enumerate(windows)})
        cfg = inputs.cfg
        encode = functools.partial(encode_examples, inputs.task, tokenizer=inputs.tokenizer, cfg=cfg, labels=inputs.labels)
        adversary = cls(cfg.adversarial, inputs.features, [sources[id(f)] for f in inputs.features], encode, inputs.collate,
                        inputs.synonyms, cfg.train.seed)
        adversary.example_losses = inputs.task.example_losses
        return adversary

    def describe(self) -> dict:
        return {"method": self.method, "forward_backward_passes_per_step": self.passes,
                "forward_only_passes_per_step": self.forward_only, "rate": self.rate, "candidates": self.candidates}

    def _variants(self, items: list[dict]) -> list[list[dict]]:
        """`candidates` perturbed features per item; an item with nothing to change keeps itself."""
        drawn, slots = [], []
        for f in items:
            k, ex, w = self.source[id(f)]
            rng = random.Random(f"{self.seed}:{self.method}:{k}:{self.calls}")
            for _ in range(self.candidates):
                new, changed = perturb(ex, self.method, self.rate, self.synonyms, rng)
                slots.append((f, w, len(drawn) if changed else None))
                if changed:
                    drawn.append(new)
        windows = self.encode(drawn).windows() if drawn else []
        # a long (windowed, NER) example may split into a different number of windows once its words
        # are misspelt: take the window of the same number, or its last; each window carries its own
        # words' labels, so any one is a correct training example
        out = [f if d is None else windows[d][min(w, len(windows[d]) - 1)] for f, w, d in slots]
        return [out[i:i + self.candidates] for i in range(0, len(out), self.candidates)]

    @torch.no_grad()
    def worst(self, model, items: list[dict], device) -> list[dict]:
        from lmtune.training.loop import inputs  # the model's inputs without any target (labels, soft_targets)
        variants = self._variants(items)
        was_training = model.training
        model.eval()  # score as the attack will: no dropout noise in the choice
        losses = []
        for c in range(self.candidates):  # one batch per candidate: memory stays that of a training step
            batch = {n: t.to(device) for n, t in self.collate([v[c] for v in variants]).items()}
            losses.append(self.example_losses(model(**inputs(batch)), batch))
        model.train(was_training)
        pick = torch.stack(losses, 1).argmax(1).tolist()
        return [v[j] for v, j in zip(variants, pick)]

    def step(self, model, batch: dict, loss_fn: Callable, backward: Callable[[torch.Tensor], None],
             no_sync: Callable = nullcontext, items: list[dict] | None = None) -> torch.Tensor:
        if items is None:
            raise ValueError("WordAdversary.step needs the micro-batch's features (items)")
        with no_sync():
            clean = loss_fn(model, batch)
            backward(clean)
        self.last_chosen = self.worst(model, items, batch["input_ids"].device)
        adv_batch = {n: t.to(batch["input_ids"].device) for n, t in self.collate(self.last_chosen).items()}
        adv = loss_fn(model, adv_batch)
        backward(adv)
        self.last_losses = [float(clean.detach()), float(adv.detach())]
        self.calls += 1
        return clean
