"""The config's JSON Schema (issue 52, item 4): `lmtune config --schema` writes it from the typed
config (the dataclasses, checked and described by a generated pydantic model), and an independent
validator (jsonschema-rs) agrees with lmtune's own loader: every example config passes, a typo, a
wrong type and an out-of-range value fail. `lmtune init` writes the schema beside the config it
writes, names it on the config's first line, and writes the data path relative to the config."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema_rs
import pytest
import yaml

from lmtune import registry
from lmtune.cli import main
from lmtune.config import CORE_SECTIONS, all_keys, build_config, json_schema, load_config, option
from lmtune.errors import InputError
from tests.conftest import toy_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]


def _is_train_config(path: Path) -> bool:
    """The YAML files in examples/, lmtune/demo/ and the apps' folders that `lmtune train` reads: not
    accelerate's launcher configs (compute_environment ...) nor an app's own config (lmtune/apps/NAME/)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return "compute_environment" not in raw and path.parent.parent.name != "apps"


CANDIDATES = sorted({*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("lmtune/demo/*.yaml"), *ROOT.glob("lmtune/apps/*/example.yaml")})
TRAIN_CONFIGS = [p for p in CANDIDATES if _is_train_config(p)]


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    """The schema as `lmtune config --schema --output FILE` writes it."""
    out = tmp_path_factory.mktemp("schema") / "lmtune.schema.json"
    assert main(["config", "--schema", "--output", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def _errors(schema: dict, instance: dict) -> list[tuple[str, str]]:
    return [("/".join(map(str, e.instance_path)), e.message) for e in jsonschema_rs.Draft7Validator(schema).iter_errors(instance)]


def test_the_schema_is_draft_07_without_refs_and_printed_as_written(schema, capsys):
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#" and jsonschema_rs.meta.is_valid(schema)
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text  # sections inlined: nothing draft-2020-only for the YAML language server
    assert schema == json_schema()
    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_validates(schema, path):
    assert _errors(schema, yaml.safe_load(path.read_text(encoding="utf-8"))) == []
    load_config(path)  # and lmtune's loader agrees


def test_the_examples_found_are_the_train_configs():
    names = {str(p.relative_to(ROOT)) for p in TRAIN_CONFIGS}
    assert {"lmtune/demo/demo.yaml", "examples/demo.yaml", "examples/ner_conll2003.yaml"} <= names
    assert not any(n.startswith(("examples/accelerate/", "lmtune/apps/")) for n in names)


def test_a_saved_config_validates(schema, tmp_path):
    """config.yaml in a run folder is Config.to_yaml(): every key, nulls included."""
    cfg = build_config({"task": "ner", "data": {"train": "t.conll", "slice_columns": ["region"]},
                        "peft": {"method": "lora", "target_modules": ["query"]}, "train": {"trackers": ["mlflow"], "lr": 1}})
    assert _errors(schema, yaml.safe_load(cfg.to_yaml())) == []


@pytest.mark.parametrize("change,path,message", [
    ({"train": {"learning_rate": 1e-4}}, "train", "'learning_rate' was unexpected"),  # a typo of a key
    ({"trian": {"epochs": 2}}, "", "'trian' was unexpected"),                         # a typo of a section
    ({"train": {"epochs": "many"}}, "train/epochs", 'is not of type "integer"'),
    ({"train": {"batch_size": 2.5}}, "train/batch_size", 'is not of type "integer"'),
    ({"data": {"max_length": "64"}}, "data/max_length", 'is not of type "integer"'),
    ({"train": {"lr": -1}}, "train/lr", "less than or equal to the minimum of 0"),
    ({"train": {"warmup_ratio": 1.0}}, "train/warmup_ratio", "greater than or equal to the maximum of 1"),
    ({"data": {"max_length": 4}}, "data/max_length", "less than the minimum of 8"),
    ({"train": {"schedule": "step"}}, "train/schedule", "is not one of"),
    ({"peft": {"method": "lorra"}}, "peft/method", "is not one of"),
    ({"train": {"trackers": ["mlfow"]}}, "train/trackers/0", "is not one of"),
])
def test_the_schema_and_the_loader_refuse_the_same_mistakes(schema, change, path, message):
    raw = yaml.safe_load((ROOT / "lmtune" / "demo" / "demo.yaml").read_text(encoding="utf-8"))
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    errors = _errors(schema, raw)
    assert len(errors) == 1 and errors[0][0] == path and message in errors[0][1], errors
    with pytest.raises(InputError):
        build_config(raw)


def test_every_key_has_its_help_choices_and_bounds_in_the_schema(schema):
    props = schema["properties"]
    assert set(props) >= set(CORE_SECTIONS) and schema["additionalProperties"] is False
    for key, f in all_keys().items():
        section, _, leaf = key.rpartition(".")
        node = props[section]["properties"][leaf] if section else props[key]
        if section:
            assert props[section]["additionalProperties"] is False, section
        assert node["description"] == f.metadata["help"], key
    train = props["train"]["properties"]
    assert train["schedule"]["enum"] == ["linear", "cosine", "constant"] and train["schedule"]["default"] == "linear"
    assert train["warmup_ratio"]["minimum"] == 0 and train["warmup_ratio"]["exclusiveMaximum"] == 1
    assert train["batch_size"] == {**train["batch_size"], "type": "integer", "minimum": 1, "default": 16}
    assert {"enum": ["tensorboard", "mlflow", "wandb"], "type": "string"} == train["trackers"]["items"]
    assert "lora" in props["peft"]["properties"]["method"]["enum"] and "ner" in props["task"]["enum"]
    lr = props["train"]["properties"]["lr"]  # X | None as a type list: the bound shows as itself in an editor
    assert (lr["type"], lr["exclusiveMinimum"]) == (["number", "null"], 0)
    assert props["abstain"]["properties"]["oos_label"]["type"] == ["string", "null"]


@dataclass
class _Shout:
    times: int = option(2, "shout: how many times.", ge=1, le=5)
    volume: float = option(0.5, "shout: loudness (the older range spelling).", range="(0, 1]")
    style: str = option("caps", "shout: how.", ("caps", "bang"))


@pytest.fixture
def shout():
    registry.config_sections.register("shout", "tests.test_config_schema:_Shout")
    yield
    registry.config_sections.unregister("shout")


def test_a_registered_section_joins_the_schema_and_is_checked(shout):
    props = json_schema()["properties"]["shout"]["properties"]
    assert (props["times"]["minimum"], props["times"]["maximum"]) == (1, 5)
    assert (props["volume"]["exclusiveMinimum"], props["volume"]["maximum"]) == (0, 1)
    assert props["style"]["enum"] == ["caps", "bang"]
    assert build_config({"shout": {"times": 5, "volume": 1}}).shout.volume == 1.0
    with pytest.raises(InputError, match=r"shout\.volume must be in \(0, 1\], got 0"):
        build_config({"shout": {"volume": 0}})
    with pytest.raises(InputError, match=r"shout\.style = 'bnag' is not one of caps, bang\. Did you mean 'bang'\?"):
        build_config({"shout": {"style": "bnag"}})


def test_init_never_replaces_another_tools_file_named_like_the_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "reviews.csv", toy_rows(40, 1))
    (tmp_path / "sub").mkdir()
    theirs = tmp_path / "sub" / "lmtune.schema.json"
    theirs.write_text('{"title": "something else"}')
    assert main(["init", "reviews.csv", "--output", "sub/x.yaml"]) == 2
    assert "is not an lmtune config schema" in capsys.readouterr().err
    assert theirs.read_text() == '{"title": "something else"}' and not (tmp_path / "sub" / "x.yaml").exists()


def test_init_into_a_subfolder_writes_paths_relative_to_the_config_and_its_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    data = write_csv(tmp_path / "data" / "reviews.csv", toy_rows(40, 1))
    assert main(["init", "data/reviews.csv", "--output", "sub/x.yaml"]) == 0
    config, written_schema = tmp_path / "sub" / "x.yaml", tmp_path / "sub" / "lmtune.schema.json"
    text = config.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=lmtune.schema.json"
    assert yaml.safe_load(text)["data"]["train"] == "../data/reviews.csv"  # relative to sub/, not to the current folder
    cfg = load_config(config)  # what `lmtune train sub/x.yaml` reads
    assert Path(cfg.data.train).resolve() == data.resolve() and Path(cfg.data.train).is_file()
    schema = json.loads(written_schema.read_text(encoding="utf-8"))
    assert schema == json_schema() and _errors(schema, yaml.safe_load(text)) == []
    assert "lmtune.schema.json" in capsys.readouterr().err
    # the same schema is not rewritten; an outdated one is
    before = written_schema.stat().st_mtime_ns
    assert main(["init", "data/reviews.csv", "--output", "sub/y.yaml"]) == 0
    assert written_schema.stat().st_mtime_ns == before and "lmtune.schema.json" not in capsys.readouterr().err
    written_schema.write_text('{"title": "lmtune config", "properties": {}}', encoding="utf-8")  # an older lmtune's: rewritten
    assert main(["init", str(data), "--output", "sub/z.yaml"]) == 0  # an absolute data path: made relative too
    assert json.loads(written_schema.read_text(encoding="utf-8")) == schema
    assert yaml.safe_load((tmp_path / "sub" / "z.yaml").read_text(encoding="utf-8"))["data"]["train"] == "../data/reviews.csv"


def test_the_train_shorthands_stay_unambiguous_as_sections_are_added():
    """`--epochs 2` / `--lr` / `--batch_size` name train.*: a registered section that reuses one of those leaf names
    (fewshot once had `epochs` and `batch_size`) would make the shorthand an unknown key."""
    from lmtune.config import _known_key, all_keys
    for leaf in ("epochs", "lr", "batch_size", "warmup_ratio", "patience"):
        if f"train.{leaf}" in all_keys():
            assert _known_key(leaf, all_keys(), {}, "command line") == f"train.{leaf}"
