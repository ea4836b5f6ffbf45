"""Applications built only on lmtune's public API (lmtune.train, lmtune.load, Run.search / embed): each
lives in its own folder with an example config, and nothing in the core names them."""
