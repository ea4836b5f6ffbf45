"""bench/harness.py's split helpers (issue 47, clean splits): train_dev never opens a test file, carves its dev
deterministically and disjoint from train, and load_test is what reads the test split.

Two checks per set: on a tmp tree of small synthetic files in each set's format (always runs), where the
test files do not exist while train_dev runs, and on ../shared/data (skipped where it is absent), where every
file opened during train_dev is recorded by an audit hook (sys.addaudithook sees every open(), whatever
calls it)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402

OPENED: list[str] = []
_RECORDING = [False]


def _audit(event: str, args: tuple) -> None:
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, Path)):
        OPENED.append(str(Path(args[0]).resolve()))


sys.addaudithook(_audit)  # hooks cannot be removed: it records only while _RECORDING is on


class record_opens:
    def __enter__(self) -> list[str]:
        OPENED.clear()
        _RECORDING[0] = True
        return OPENED

    def __exit__(self, *exc) -> None:
        _RECORDING[0] = False


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def synthetic(root: Path, tests: bool) -> None:
    """Each set's files in its own format (../shared/README.md), 60 rows each; the test files only when `tests`."""
    n = 60
    files = {
        "sst2/train.tsv": "sentence\tlabel\n" + "".join(f"train sentence {i} \t{i % 2}\n" for i in range(n)),
        "banking77/train.csv": "text,category\n" + "".join(f"\"train, text {i}\",intent_{i % 3}\n" for i in range(n)),
        "mrpc/msr_paraphrase_train.txt": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                         + "".join(f"{i % 2}\t{i}\t{i + 1000}\ta \"train\" {i}\tb {i}\n" for i in range(n)),
        "stsb/sts-train.csv": "".join(f"g\tf\t2012\t{i:04d}\t{i % 5}.000\ttrain a {i}\ttrain b {i}\n" for i in range(n)),
        "stsb/sts-dev.csv": "".join(f"g\tf\t2012\t{i:04d}\t{i % 5}.000\tdev a {i}\tdev b {i}\tsrc\tsrc\n" for i in range(n)),
        "conll2003/train.txt": "-DOCSTART- -X- -X- O\n\n" + "".join(f"Train{i} NNP B-NP B-ORG\nwent VBD B-VP O\n\n" for i in range(n)),
        "conll2003/valid.txt": "".join(f"Dev{i} NNP B-NP B-PER\nsaid VBD B-VP O\n\n" for i in range(n)),
        "goemotions/labels.txt": "admiration\namusement\nneutral",
        "goemotions/train.tsv": "".join(f"\"train text, {i}\"\t{i % 3},{(i + 1) % 3}\ttr{i}\n" for i in range(n)),
        "goemotions/dev.tsv": "".join(f"dev text {i}\t{i % 3}\tdv{i}\n" for i in range(n)),
        "semeval2010_task8/TRAIN_FILE.TXT": "".join(f"{i + 1}\t\"The <e1>train{i}</e1> in the <e2>box</e2>.\"\n"
                                                    f"{'Other' if i % 2 else 'Content-Container(e1,e2)'}\nComment:\n\n"
                                                    for i in range(n)),
    }
    test_files = {
        "sst2/dev.tsv": "sentence\tlabel\n" + "".join(f"test sentence {i} \t{i % 2}\n" for i in range(20)),
        "banking77/test.csv": "text,category\n" + "".join(f"test text {i},intent_{i % 3}\n" for i in range(20)),
        "mrpc/msr_paraphrase_test.txt": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                        + "".join(f"{i % 2}\t{i}\t{i + 1}\ttest a {i}\ttest b {i}\n" for i in range(20)),
        "stsb/sts-test.csv": "".join(f"g\tf\t2012\t{i:04d}\t1.000\ttest a {i}\ttest b {i}\n" for i in range(20)),
        "conll2003/test.txt": "".join(f"Test{i} NNP B-NP B-LOC\n\n" for i in range(20)),
        "goemotions/test.tsv": "".join(f"test text {i}\t2\tte{i}\n" for i in range(20)),
        "semeval2010_task8/TEST_FILE_FULL.TXT": "".join(f"{9000 + i}\t\"A <e1>test{i}</e1> and <e2>x</e2>.\"\nOther\nComment:\n\n"
                                                        for i in range(20)),
    }
    for rel, text in files.items():
        _write(root / rel, text)
    if tests:
        for rel, text in test_files.items():
            _write(root / rel, text)
    # SQuAD: train, dev and test are articles of the one file the project has
    arts = [{"title": f"art{a}", "paragraphs": [{"context": f"Article {a} context about topic {a}.",
                                                 "qas": [{"id": f"a{a}q{q}", "question": f"What about {a}/{q}?",
                                                          "answers": [{"text": f"topic {a}", "answer_start": 24 + len(str(a)) - 1}]}
                                                         for q in range(3)]}]} for a in range(20)]
    _write(root / "squad" / "dev-v1.1.json", json.dumps({"data": arts, "version": "1.1"}))


def keys(rows: list[dict]) -> list[str]:
    return [r["source"] for r in rows]


@pytest.mark.parametrize("name", harness.ORDER)
def test_train_dev_reads_no_test_file_and_carves_a_fixed_disjoint_dev(tmp_path, name):
    synthetic(tmp_path, tests=False)  # the test files do not exist: reading one would fail
    test_paths = {str((tmp_path / rel).resolve()) for rel in harness.SETS[name].test_files
                  if rel not in harness.SETS[name].train_files}
    with record_opens() as opened:
        train, dev = harness.train_dev(name, root=tmp_path)
    assert train and dev
    assert not test_paths & set(opened), f"{name}: train_dev opened {test_paths & set(opened)}"
    assert set(keys(train)).isdisjoint(keys(dev)), f"{name}: dev overlaps train"
    again = harness.train_dev(name, root=tmp_path)
    assert (keys(train), keys(dev)) == (keys(again[0]), keys(again[1])), f"{name}: the split is not deterministic"
    assert keys(harness.train_dev(name, root=tmp_path, full=True)[1]) == keys(dev), f"{name}: the ceiling's dev differs"

    synthetic(tmp_path, tests=True)
    with record_opens() as opened:
        test = harness.load_test(name, root=tmp_path)
    assert test
    assert test_paths <= set(opened) or name == "squad"
    if name == "squad":  # one file: the test articles' questions never reach train or dev
        test_ids = {r["id"] for r in test}
        assert test_ids.isdisjoint(r["id"] for r in train + dev)
        article = {r["id"]: r["context"] for r in train + dev + test}
        assert {article[i] for i in test_ids}.isdisjoint(article[r["id"]] for r in train + dev)
    else:
        assert set(keys(test)).isdisjoint(keys(train) + keys(dev))
    assert len(harness.gold(name, test)) == len(test)


def test_carved_dev_depends_on_the_split_seed_only():
    rows = [{"source": str(i)} for i in range(100)]
    train, dev = harness.carve_dev(rows)
    assert len(dev) == 10 and len(train) == 90
    assert keys(harness.carve_dev(rows)[1]) == keys(dev)
    assert keys(harness.carve_dev(rows, seed=7)[1]) != keys(dev)
    assert set(keys(train)).isdisjoint(keys(dev)) and sorted(keys(train) + keys(dev), key=int) == keys(rows)


REAL = harness.SHARED


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("name", harness.ORDER)
def test_real_train_dev_opens_no_test_file(name):
    spec = harness.SETS[name]
    test_paths = {str((REAL / rel).resolve()) for rel in spec.test_files if rel not in spec.train_files}
    with record_opens() as opened:
        train, dev = harness.train_dev(name)
    assert not test_paths & set(opened), f"{name}: train_dev opened {test_paths & set(opened)}"
    data_files = {f for f in opened if f.startswith(str(REAL.resolve()))}  # not the modules imported on first use
    assert data_files <= {str((REAL / rel).resolve()) for rel in spec.train_files}, data_files
    assert set(keys(train)).isdisjoint(keys(dev))
    expected = {"sst2": (3600, 400), "banking77": (9003, 1000), "mrpc": (3669, 407), "stsb": (5749, 1500),
                "conll2003": (4000, 3250), "goemotions": (10000, 5426), "semeval": (7200, 800), "squad": (3000, 600)}
    assert (len(train), len(dev)) == expected[name]
    if name == "squad":
        test_ids = {r["id"] for r in harness.load_test(name)}
        assert test_ids and test_ids.isdisjoint(r["id"] for r in train + dev)


def test_a_kept_unit_is_made_once_stamped_with_its_code_and_read_back_unchanged(tmp_path, capsys):
    calls = []

    def make() -> dict:
        calls.append(1)
        return {"accuracy": 0.5}
    path = tmp_path / "units" / "set-s42-side.json"
    first = harness.kept_unit(path, "unit", make)
    assert first["accuracy"] == 0.5 and first["wall_s"] >= 0
    assert set(first["made_at"]) == {"commit", "dirty", "date"} and first["made_at"]["commit"]
    again = harness.kept_unit(path, "unit", make)
    assert again == first and calls == [1]  # read back, not made again
    assert f"kept from {path} (made at commit {first['made_at']['commit']}" in capsys.readouterr().err
    assert harness.kept_unit(None, "unit", make)["accuracy"] == 0.5 and calls == [1, 1]  # None: nothing kept


def test_the_multitask_last_line_joins_the_distill_benchs_kept_seeds(tmp_path):
    import multitask  # bench/multitask.py
    for seed, acc in ((42, 0.80), (43, 0.90)):
        unit = {"distill": {"teacher_acc": 0.9, "student_acc": acc, "hard_only_acc": 0.7, "cost_ratio": 0.2},
                "cross_architecture": {}, "made_at": {}}
        (tmp_path / f"distill-lall-s{seed}.json").write_text(json.dumps(unit))
    (tmp_path / "distill-l800-s42.json").write_text("{}")  # a --limit check, not the bench: left out
    got = multitask.distill_figures(tmp_path)
    assert got == {"teacher_acc": 0.9, "student_acc": 0.85, "hard_only_acc": 0.7, "cost_ratio": 0.2, "seeds": [42, 43]}
    assert multitask.distill_figures(tmp_path / "none") == {"seeds": []}
