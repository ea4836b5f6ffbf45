"""The built-in entries of every registry (lmtune/registry.py). Targets are "module:attribute" strings,
imported only when used, so this module imports no implementation and config.py can read the names
without an import cycle. A newcomer adds one module and one line here (or calls register() itself).
"""
from __future__ import annotations

from lmtune.registry import (adversaries, analyses, attacks, augmenters, backends, config_sections, exporters, peft_methods,
                             query_strategies, tasks, trackers)

tasks.register("classification", "lmtune.tasks.classification:ClassificationTask")
tasks.register("ner", "lmtune.tasks.ner:NerTask")
tasks.register("multilabel", "lmtune.tasks.multilabel:MultiLabelTask")
tasks.register("regression", "lmtune.tasks.regression:RegressionTask")
tasks.register("relation", "lmtune.tasks.relation:RelationTask")
tasks.register("qa", "lmtune.tasks.qa:QATask")
# objectives: the train.objective values the task trains with (every task: sft, its own loss); generation
# also learns from preference pairs (lmtune.tasks.preference)
tasks.register("generation", "lmtune.tasks.generation:GenerationTask", objectives=("sft", "dpo", "orpo"))
tasks.register("retrieval", "lmtune.tasks.retrieval:RetrievalTask")
tasks.register("joint", "lmtune.tasks.joint:JointTask")  # intent + slots over one encoder (classification + NER)
tasks.register("multitask", "lmtune.tasks.multitask:MultiTask")  # several tasks, each with its own data, over one encoder

# default_lr: PEFT trains few weights and needs larger steps than full fine-tuning;
# mergeable: the adapter folds into the weights (lmtune merge, ONNX export); disables: peft's disable_adapter gives
# back the model the adapter started from (the LoRA family starts as the identity: B = 0, IA3's scales 1), so a
# loaded DPO run recovers its reference; prefix and prompt tuning start from random virtual tokens, and
# lmtune's own bottleneck adapter has no switch
peft_methods.register("none", None, default_lr=None, mergeable=False)  # full fine-tuning
peft_methods.register("lora", "lmtune.peft:build_lora", default_lr=1e-3, mergeable=True, disables=True)
peft_methods.register("adalora", "lmtune.peft:build_adalora", default_lr=2e-3, mergeable=True, disables=True)
peft_methods.register("ia3", "lmtune.peft:build_ia3", default_lr=5e-3, mergeable=True, disables=True)
peft_methods.register("prefix", "lmtune.peft:build_prefix", default_lr=1e-2, mergeable=False)
peft_methods.register("prompt", "lmtune.peft:build_prompt", default_lr=3e-2, mergeable=False)
peft_methods.register("adapter", "lmtune.peft:build_adapter", default_lr=1e-3, mergeable=False)

# the target is a class with build(AdversaryInputs) and describe(); kind: embedding (a perturbation of
# the word-embedding output) or word (edited text); needs_synonyms: the recipe builds the synonym table
adversaries.register("none", None, kind=None)
adversaries.register("fgm", "lmtune.robust.adversarial:EmbeddingAdversary", kind="embedding")
adversaries.register("pgd", "lmtune.robust.adversarial:EmbeddingAdversary", kind="embedding")
adversaries.register("freelb", "lmtune.robust.adversarial:EmbeddingAdversary", kind="embedding")
adversaries.register("typo", "lmtune.robust.adversarial:WordAdversary", kind="word")
adversaries.register("synonym", "lmtune.robust.adversarial:WordAdversary", kind="word", needs_synonyms=True)

# kind perturb: the target replaces one word (word, rng, synonyms) -> word, on a random share of the words;
# kind search: the greedy word-importance attack (needs one gold label per example)
attacks.register("typo", "lmtune.robust.attack:typo_word", kind="perturb", needs_synonyms=False)
attacks.register("synonym", "lmtune.robust.attack:synonym_word", kind="perturb", needs_synonyms=True)
attacks.register("search", "lmtune.robust.attack:search_attack", kind="search")

# kind word: the target edits the example's words (lmtune.robust.augment.edit calls it); kind model:
# a model substitutes words (mlm) or rewrites the whole text (backtranslate: tags cannot follow)
augmenters.register("synonym", "lmtune.robust.augment:synonym_edit", kind="word", needs_synonyms=True)
augmenters.register("insert", "lmtune.robust.augment:insert_edit", kind="word", needs_synonyms=True)
augmenters.register("swap", "lmtune.robust.augment:swap_edit", kind="word")
augmenters.register("delete", "lmtune.robust.augment:delete_edit", kind="word")
augmenters.register("typo", "lmtune.robust.augment:typo_edit", kind="word")
# a model-kind target takes all its rows at once: (list of (example, rng), AugmentConfig) -> new examples
augmenters.register("mlm", "lmtune.robust.augment:mlm_substitute", kind="model")
augmenters.register("backtranslate", "lmtune.robust.augment:backtranslate", kind="model", rewrites_text=True)

# file: what the run's export/ folder must hold for the backend (torch: the run's model/);
# auto: the order in which `--backend auto` tries them (fastest first); gradients: explain can use
# Integrated Gradients (else occlusion)
backends.register("torch", None, file=None, auto=2, gradients=True)
backends.register("onnx", "lmtune.backends.onnx:OnnxModel", file="model.onnx", auto=1)
backends.register("onnx-int8", "lmtune.backends.onnx:OnnxModel", file="model.int8.onnx", auto=0)

trackers.register("tensorboard", "lmtune.tracking.tensorboard:TensorBoardLogger")
trackers.register("mlflow", "lmtune.tracking.mlflow:MLflowTracker")
trackers.register("wandb", "lmtune.tracking.wandb:WandbTracker")

# run analyses (lmtune.analysis): the target is an Analysis (its function, report section and command
# options); report.md shows their sections in this order. comparison, distill, continual and slices are written by
# training and have no command; robustness's command is `lmtune attack`.
analyses.register("comparison", "lmtune.analyses.comparison:ANALYSIS")
analyses.register("distill", "lmtune.analyses.distill:ANALYSIS")  # written by `lmtune distill`
analyses.register("continual", "lmtune.analyses.continual:ANALYSIS")
analyses.register("selftrain", "lmtune.analyses.selftrain:ANALYSIS")  # written by training (data.unlabeled)
analyses.register("fewshot", "lmtune.analyses.fewshot:ANALYSIS")  # written by training's fewshot stage
analyses.register("drift", "lmtune.analyses.drift:ANALYSIS")
analyses.register("slices", "lmtune.analyses.fairness:SLICES")
analyses.register("fairness", "lmtune.analyses.fairness:ANALYSIS")
analyses.register("explain", "lmtune.analyses.explain:ANALYSIS")
analyses.register("robustness", "lmtune.analyses.robustness:ANALYSIS")
analyses.register("lengths", "lmtune.analyses.lengths:ANALYSIS")
analyses.register("active", "lmtune.analyses.active:ANALYSIS")  # written by `lmtune label --import` (the learning curve)

# config fields declared by the task or feature that reads them (lmtune.config composes the sections);
# section: the config section the fields join, so their YAML keys (data.head_column ...) stay what they were
config_sections.register("generate", "lmtune.tasks.generation_config:GenerateConfig")
config_sections.register("retrieval", "lmtune.tasks.retrieval_config:RetrievalConfig")
config_sections.register("preference", "lmtune.tasks.generation_config:PreferenceOptions", section="train")
config_sections.register("relation_columns", "lmtune.tasks.relation_config:RelationColumns", section="data")
config_sections.register("multilabel_columns", "lmtune.tasks.multilabel_config:MultiLabelColumns", section="data")
config_sections.register("ner_columns", "lmtune.tasks.ner_config:NerColumns", section="data")
config_sections.register("joint", "lmtune.tasks.joint_config:JointConfig")
config_sections.register("multitask", "lmtune.tasks.multitask_config:MultitaskConfig")
config_sections.register("joint_columns", "lmtune.tasks.joint_config:JointColumns", section="data")
config_sections.register("pair_options", "lmtune.data.pairs:PairOptions", section="data")
config_sections.register("unlabeled", "lmtune.selftrain:UnlabeledData", section="data")  # data.unlabeled
config_sections.register("selftrain", "lmtune.selftrain:SelfTrainConfig")
config_sections.register("fewshot", "lmtune.fewshot_config:FewShotConfig")

# export formats (lmtune export --format): quantize: the --quantize values each declares; options: the other
# export flags it takes; tasks: the run tasks it serves (None: all); supports: what the error names otherwise
# refuses: {task capability (lmtune.tasks.base: GENERATE is "generate"): why, and what to use instead}: the ONNX
# graph is one forward pass to logits, and a generating task's output is a decoding loop over it (KV cache,
# sampling, constraints) that the graph does not hold
exporters.register("onnx", "lmtune.export.onnx:export_run", quantize=("int8",), options=("prune", "recover_epochs", "sample"),
                   tasks=None, refuses={"generate": "its outputs come from a decoding loop, not one forward pass; export it "
                                                  "with --format gguf for llama.cpp, Ollama or LM Studio (Llama-architecture "
                                                  "models), or serve the run itself (lmtune serve)."})
exporters.register("gguf", "lmtune.export.gguf:export_gguf", quantize=("f16", "q8_0", "q4_k_m"), options=("sample",),
                   tasks=("generation",), supports="generation runs of Llama-architecture models (LlamaForCausalLM: "
                                                   "SmolLM2, Llama 3 ...)")

# active learning's query strategies (lmtune label RUN_DIR --strategy NAME): the target picks pool rows, (pool, k) ->
# [(row, score)]; multilabel: it has a multi-label form (each below does: see lmtune/active/strategies.py)
query_strategies.register("entropy", "lmtune.active.strategies:entropy", multilabel=True)
query_strategies.register("margin", "lmtune.active.strategies:margin", multilabel=True)
query_strategies.register("coreset", "lmtune.active.strategies:coreset", multilabel=True)
query_strategies.register("badge", "lmtune.active.strategies:badge", multilabel=True)
query_strategies.register("random", "lmtune.active.strategies:random", multilabel=True)
