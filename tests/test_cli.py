"""The command line end to end, the packaged MiniLM, and the promises of the README and the docs."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForSequenceClassification

from lmtune.cli import main
from lmtune.config import all_keys

ROOT = Path(__file__).resolve().parent.parent


def test_cli_train_predict_evaluate(tiny_config, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config))
    assert main(["train", str(cfg_path), "--epochs", "2", "--train.eval_every=4"]) == 0
    out = capsys.readouterr().out
    run_dir = Path(re.search(r"run dir: (.+)", out).group(1))
    assert re.search(r"test: accuracy \d\.\d{4}  macro_f1 \d\.\d{4}", out)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2

    assert main(["predict", str(run_dir), "--text", "a great day", "--text", "terrible food"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a great day", "terrible food"]
    assert all(set(r["probabilities"]) == {"neg", "pos"} and r["label"] in ("neg", "pos") for r in rows)

    out_file = tmp_path / "preds.jsonl"
    assert main(["predict", str(run_dir), "--input", tiny_config["data"]["test"], "--output", str(out_file)]) == 0
    preds = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(preds) == 32 and all("gold" in p for p in preds)

    assert main(["evaluate", str(run_dir), "--data", tiny_config["data"]["test"]]) == 0
    metrics = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert metrics["accuracy"] == pytest.approx(saved["accuracy"])
    assert metrics["n"] == 32

    assert main(["predict", str(run_dir)]) == 2
    assert "either --input FILE (- for standard input) or --text" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--data", "x.csv"]) == 2
    assert "not a finished lmtune run" in capsys.readouterr().err


def test_help_for_every_command(capsys):
    for cmd in ("train", "evaluate", "predict", "demo"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "--data" in out and "--text" in out


def test_the_config_page_documents_every_key_and_the_readme_starts_with_the_two_commands():
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_keys", ROOT / "docs" / "hooks" / "config_keys.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    config_page = (ROOT / "docs" / "config.md").read_text()
    assert hook.MARKER in config_page  # the table is rendered from the fields at build time (tests/test_docs.py builds it)
    table = hook.keys_table()
    for key in all_keys():
        assert f"| `{key}` |" in table, key
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL).group(1).strip().splitlines()
    assert first_block == ["python3 dev.py demo", "python3 dev.py test"]
    assert readme.index("```bash") < readme.index("\n## ")
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_demo_command_on_the_packaged_model(tmp_path):
    """`python3 dev.py demo` as written (the venv exists by now, so set-up is a no-op)."""
    proc = subprocess.run([sys.executable, str(ROOT / "dev.py"), "demo", "--output_dir", str(tmp_path / "runs"),
                           "--train.epochs", "2", "--train.progress", "none"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(re.search(r"run dir: (.+)", proc.stdout).group(1))
    if not run_dir.is_absolute():
        run_dir = ROOT / run_dir
    acc = float(re.search(r"test: accuracy (\d\.\d+)", proc.stdout).group(1))
    assert acc > 0.6  # 3 balanced classes: chance is 0.33
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert set(model.config.id2label.values()) == {"negative", "neutral", "positive"}
    assert (run_dir / "report.md").is_file() and (run_dir / "confusion_matrix_test.png").is_file()
    # the model card: the Hub's parser reads it, and its metrics are metrics.json's
    from huggingface_hub import ModelCard
    card = ModelCard.load(run_dir / "model" / "README.md")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    shown = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert shown[("test", "accuracy")] == metrics["test"]["accuracy"] and shown[("dev", "f1")] == metrics["dev"]["macro_f1"]
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and card.data.pipeline_tag == "text-classification"
    assert card.data.license == "apache-2.0"  # from the packaged MiniLM's own card


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) + [ROOT / "lmtune" / "demo" / "demo.yaml"],
                         ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    from lmtune.config import load_config
    cfg = load_config(path)
    assert Path(cfg.data.train).is_absolute()
    if "demo" in path.name:
        assert Path(cfg.data.train).is_file()
