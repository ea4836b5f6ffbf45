"""The `fewshot` config section (registered in lmtune/registrations.py), apart from lmtune.fewshot so that reading the
config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option
from lmtune.errors import InputError


@dataclass
class FewShotConfig:
    """Few-shot classification in the style of SetFit (Tunstall et al. 2022): contrastive pair fine-tuning of the
    sentence embedding, then a logistic-regression head on it (lmtune.fewshot; docs/fewshot.md).

    Why these defaults: they are SetFit's (num_iterations 20, one contrastive epoch, body learning rate 2e-5, batch 16,
    LogisticRegression with C 1 on the frozen body). Why auto stops at 64 labeled examples per class: SetFit's paper
    measures its lead over standard fine-tuning at 8 to 64 examples per class, and the lead shrinks as examples grow
    (at a few hundred per class plain fine-tuning catches up), while the pairs grow with the examples."""
    method: str = option("auto", "Few-shot method for classification. setfit: contrastive pair fine-tuning of the checkpoint's "
                                 "sentence embedding, then a logistic-regression head on it (SetFit); none: plain fine-tuning; "
                                 "auto: setfit when the checkpoint is a sentence-embedding model, the median class and the mean class "
                                 "have at most fewshot.max_per_class labeled training examples, and the run reads single texts without PEFT "
                                 "or continual.from_run.", ("auto", "setfit", "none"))
    max_per_class: int = option(64, "auto: the most labeled training examples of the median class (and of the mean class) for which setfit is chosen "
                                    "(gold labels: a self-training student's pseudo-labels are not counted, it keeps its run's "
                                    "method).", ge=1)
    iterations: int = option(20, "setfit: pair rounds; each round pairs every training example with one random example of its "
                                 "class (positive) and one of another class (negative), as SetFit's num_iterations.", ge=1)
    max_pairs: int = option(0, "setfit: at most this many pairs (a seeded sample of them); 0 = all.", ge=0)
    contrastive_epochs: int = option(1, "setfit: passes of the contrastive stage over its pairs.", ge=1)
    pair_batch_size: int = option(16, "setfit: pairs per contrastive step.", ge=1)
    body_lr: float = option(2e-5, "setfit: learning rate of the encoder in the contrastive stage (linear decay after 10% warmup).",
                            gt=0)
    head_c: float = option(1.0, "setfit: inverse L2 strength of the logistic-regression head (scikit-learn's C).", gt=0)
    end_to_end: bool = option(False, "setfit: after the head is fitted, the training loop fine-tunes the encoder too (train.lr); "
                                     "false keeps the encoder as the contrastive stage left it and the loop trains the head only.")
    label_prototypes: bool = option(True, "setfit: start the head from the embeddings of the label names (when they are words, not "
                                          "ids like 0 or LABEL_3) or of fewshot.label_descriptions; the head's L2 penalty then "
                                          "pulls towards these prototypes instead of towards zero.")
    label_descriptions: dict[str, str] | None = option(None, "setfit: label -> a short description of the class, embedded as the "
                                                             "class's prototype (labels without one use their name).")

    def validate(self, cfg, where: str) -> None:
        if self.method != "setfit":
            return
        if cfg.data.text_pair_column:
            raise InputError(f"{where}: fewshot.method setfit embeds single texts; sentence pairs (data.text_pair_column) train "
                             "with fewshot.method none.")
        if cfg.peft.method != "none":
            raise InputError(f"{where}: fewshot.method setfit fine-tunes the whole encoder; set peft.method none, or "
                             "fewshot.method none.")
        if cfg.continual.from_run:
            raise InputError(f"{where}: fewshot.method setfit starts from the checkpoint, not from continual.from_run; set one "
                             "of them.")
