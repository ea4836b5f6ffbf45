"""The built-in run analyses, one module each: an `lmtune.analysis.Analysis` (its function, report
section and command options), registered by one line in lmtune/registrations.py."""
