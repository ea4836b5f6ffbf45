"""The config keys of task retrieval (registered in lmtune/registrations.py), apart from the task itself so that
reading the config (`lmtune train --help`, `lmtune config`, the JSON Schema) imports no torch."""
from __future__ import annotations

from dataclasses import dataclass

from lmtune.config import option


@dataclass
class RetrievalConfig:
    """The `retrieval` config section, owned by this task (registered in lmtune/registrations.py)."""
    hard_negatives: int = option(1, "task retrieval: BM25 hard negatives per training query, mined from the training documents "
                                    "(the best-scoring ones not relevant to the query); 0 = in-batch negatives only.", ge=0)
    negative_column: str | None = option(None, "task retrieval: a column of given hard negatives (one text, or a JSON list of texts); "
                                               "rows that have them are not mined.")
    logq_correction: bool = option(False, "task retrieval: subtract each document's log frequency among the training positives from "
                                          "its in-batch logit (Yi et al. 2019, sampling-bias correction). In-batch negatives are "
                                          "sampled as often as a document is a positive, so without it frequent documents (popular "
                                          "items) are pushed down; turn it on when positives repeat a lot (recommendation).")
    corpus: str | None = option(
        None, path=True, help="task retrieval: the documents the run's index holds (`lmtune search`, predict); default: every "
                                      "distinct document of train, dev and test.")
    corpus_column: str = option("text", "retrieval.corpus: the column that holds each document's text.")
    corpus_id_column: str | None = option(None, "retrieval.corpus: a column of document ids, returned with each result.")
