"""Which paths the dashboard may touch: the working directory, and the folders the person who started
`lmtune ui` allowed with `--allow-path DIR`. Every path a browser names (a file to inspect or clean,
and every path-valued key of a job config) is resolved, symlinks followed, and refused with 403 when
it lands anywhere else, before anything reads it. A refusal names the key and the path as given, never
what the file holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

from lmtune.config import Config, all_keys, config_file_keys, load_config, path_keys

# Path-valued config keys are the ones declared with option(..., path=True) (lmtune.config.path_keys):
# build_config rebases them against the job's working directory (Jobs.start), and check_config confines them.
# "Hugging Face id or local path": a hub id resolves, as a path, inside the working directory (so it is
# accepted), a local folder anywhere else is refused.
NAME_OR_PATH_KEYS = ("data.hub", "model.name", "augment.mlm_model", "augment.translate_to", "augment.translate_back")
# Not paths, though their help mentions files or folders: column names, formats, choices, hub subsets.
NOT_PATHS = ("data.hub_config", "data.hub_split_map", "data.format", "data.encoding", "data.tag_scheme",
             "generate.reference_columns", "run_name", "joint.unseen_labels", "multitask.names")
SPECIAL_KEYS = ("output_dir", "model.gguf_file", "tune.storage")  # checked by check_config's own rules
SOURCE_PREFIXES = ("hub:", "memory:")  # data sources that are not files (lmtune.data.hf_datasets)


class PathRefused(HTTPException):
    """403: a path outside the working directory and the allowed folders."""

    def __init__(self, key: str, given: str, why: str = "outside the working directory (start `lmtune ui "
                                                       "--allow-path DIR` to allow another folder)") -> None:
        super().__init__(403, f"{key}: {given}: {why}")


@dataclass(frozen=True)
class Confinement:
    workdir: Path
    allowed: tuple[Path, ...] = ()

    @classmethod
    def of(cls, workdir: str | Path, allow_paths: tuple[str, ...] | list[str] = ()) -> Confinement:
        return cls(Path(workdir).resolve(), tuple(Path(p).expanduser().resolve() for p in allow_paths))

    def inside(self, path: Path) -> bool:
        return any(path == root or root in path.parents for root in (self.workdir, *self.allowed))

    def path(self, given: str, key: str = "path", base: Path | None = None) -> Path:
        """`given` resolved (relative to `base`, default the working directory); refused unless inside."""
        try:
            path = ((base or self.workdir) / Path(given).expanduser()).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: not a usable path either way
            raise PathRefused(key, given) from None
        if not self.inside(path):
            raise PathRefused(key, given)
        return path

    def check_config(self, cfg: Config) -> None:
        """Every path-valued key of a built job config (its data paths already rebased by build_config), and those
        of the config files it names (a multitask run's sub-task files: their data is read too)."""
        self._paths(cfg)
        self.path(cfg.output_dir, "output_dir")
        if cfg.model.gguf_file:  # a file in model.name's folder (or hub repo): it must not climb out of it
            self.path(cfg.model.gguf_file, "model.gguf_file", base=self.workdir / cfg.model.name)
        self._storage(cfg.tune.storage)

    def _paths(self, cfg: Config, depth: int = 0) -> None:
        for key in path_keys() + NAME_OR_PATH_KEYS:
            section, _, leaf = key.rpartition(".")
            value = getattr(getattr(cfg, section) if section else cfg, leaf)
            for v in value if isinstance(value, list) else [value]:
                self._source(key, v)
        for key in config_file_keys():  # already confined above, as files; now what they point at
            section, _, leaf = key.rpartition(".")
            for v in getattr(getattr(cfg, section), leaf) or []:
                if depth:  # a config file naming config files: one level is what multitask reads
                    raise PathRefused(key, str(v), "a config file named by a config file may not name config files")
                self._paths(load_config(self.path(str(v), key)), depth + 1)

    def _source(self, key: str, value: object) -> None:
        if not value:
            return
        text = str(value)
        if text.startswith("memory:"):  # an in-process dataset: a training child has none, nothing is read
            return
        if text.startswith("hub:"):  # hub:NAME:CONFIG:SPLIT, and datasets.load_dataset reads a local NAME folder
            text = text[4:].split(":", 1)[0]
        self.path(text, key)

    def _storage(self, storage: str | None) -> None:
        """A journal file or a database URL; a SQLite URL names a file too."""
        if not storage:
            return
        if "://" not in storage:
            self.path(storage, "tune.storage")
        elif storage.startswith("sqlite"):
            self.path(storage.split(":///", 1)[-1] or ".", "tune.storage")


def run_name_ok(name: object) -> bool:
    """A run name is one folder name under the runs folder: no separators, no `..`, not absolute."""
    import re
    return name is None or (isinstance(name, str) and re.fullmatch(r"[\w][\w.-]{0,127}", name) is not None)


def unclassified_keys() -> list[str]:
    """Config keys whose help speaks of files, folders or paths but that this module does not classify;
    the tests keep it empty, so a new path-valued key cannot slip past the dashboard unconfined."""
    import re
    words = re.compile(r"\b(file|files|folder|path|paths|dir|directory|url)\b", re.I)
    known = path_keys() + NAME_OR_PATH_KEYS + SPECIAL_KEYS + NOT_PATHS
    return [k for k, f in all_keys().items() if words.search(f.metadata["help"]) and k not in known]
