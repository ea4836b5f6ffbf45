"""Adversarial training on the embedding layer: FGM, PGD and FreeLB.

Written here rather than taken from a library because none of the maintained ones plugs into a
training loop: each is a few lines around the step. We perturb the *output* of the word-embedding
layer through a forward hook (a delta tensor added to it) instead of editing the embedding weights
in place as the usual FGM snippets do: the weights are never touched, so nothing has to be
"restored", it works when the embeddings are frozen (PEFT, model.freeze_embeddings), and each
example gets its own perturbation, normalized over its real (non-padding) tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

from lmtune.config import AdversarialConfig

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
        self._delta: torch.Tensor | None = None
        self.last_losses: list[float] = []  # clean, then each adversarial loss of the last step (tests, logs)

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
             no_sync: Callable = nullcontext) -> torch.Tensor:
        """loss_fn(model, batch) -> summed loss; backward(loss) scales and back-propagates it (the
        loop's accelerator.backward); passes whose parameter gradients are not wanted run under
        no_sync so DDP all-reduces once per micro-batch."""
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


def plain_step(model, batch: dict, loss_fn: Callable, backward: Callable[[torch.Tensor], None],
               no_sync: Callable = nullcontext) -> torch.Tensor:
    loss = loss_fn(model, batch)
    backward(loss)
    return loss
