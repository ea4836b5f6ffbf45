"""The MLflow pyfunc model of a run whose model/ folder no transformers pipeline reads as lmtune does
(NER spans, regression, multi-label thresholds, QA, retrieval, generation, adapters, ensembles,
abstention): it wraps lmtune.load, so `mlflow.pyfunc.load_model` and `mlflow models serve` predict
exactly what `lmtune predict` does. Loading it needs lmtune installed where it is loaded.

It lives in its own importable module because MLflow pickles the python_model by reference.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class LmtuneModel(mlflow.pyfunc.PythonModel):
    """A run folder (model/, metrics.json, index/ where the task has one) logged as the artifact "run"."""

    # no type hints on these two: MLflow would read them as an input schema (and warn that Any is none)
    def load_context(self, context):
        from lmtune.inference import load
        self.run = load(context.artifacts["run"])

    def predict(self, context, model_input, params=None):
        """Texts (a list, a Series, or a DataFrame with a `text` column and, for pair tasks, `text_pair`)
        -> one row per text with lmtune's prediction fields (the text itself is not echoed)."""
        import pandas as pd
        texts = _texts(model_input)
        rows = self.run.predict(texts)
        return pd.DataFrame([{k: v for k, v in r.items() if k not in ("text", "text_pair")} for r in rows])


def _texts(model_input: Any) -> list:
    import pandas as pd
    if isinstance(model_input, pd.DataFrame):
        if "text_pair" in model_input.columns:
            return list(zip(model_input["text"].astype(str), model_input["text_pair"].astype(str)))
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        return [str(t) for t in model_input[column]]
    if isinstance(model_input, pd.Series):
        return [str(t) for t in model_input]
    if isinstance(model_input, str):
        return [model_input]
    return [tuple(t) if isinstance(t, (list, tuple)) else str(t) for t in model_input]
