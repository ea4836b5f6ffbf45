"""Search and combination: hyperparameter search (tune), k-fold cross-validation (cv), ensembles and
model soups (combine). `members` holds the ensemble model, which loading a run needs without the rest."""
