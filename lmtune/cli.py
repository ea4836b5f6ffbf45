"""Command line: thin parsing that builds a Config and calls the Python API."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lmtune.config import describe_fields, parse_overrides
from lmtune.errors import InputError
from lmtune.registry import backends

DEMO_CONFIG = Path(__file__).parent / "demo" / "demo.yaml"

TRAIN_HELP = """Fine-tune a model: lmtune train CONFIG.yaml [--resume [RUN_DIR]] [--section.key VALUE ...]

Any config key can be overridden on the command line, e.g. --train.lr 3e-5 --data.max_length 64
(a bare leaf name such as --lr works when it is unambiguous). Unknown keys are errors.

Config keys:
"""


def _print_headline(run) -> None:
    print(f"run dir: {run.run_dir}")
    for split in ("dev", "test"):
        m = run.metrics.get(split)
        if m:
            shown = "  ".join(f"{k} {m[k]:.4f}" for k in run.metrics.get("headline", []) if k != "loss" and k in m)
            print(f"{split}: {shown}  (n={m['n']})")
    print(f"report: {run.run_dir / 'report.md'}")


def cmd_train(args: list[str], config: str | None) -> int:
    from lmtune.api import train
    resume: bool | str = False
    if "--resume" in args:
        i = args.index("--resume")
        nxt = args[i + 1] if i + 1 < len(args) else None
        if nxt is not None and not nxt.startswith("--"):
            resume = nxt
            del args[i:i + 2]
        else:
            resume = True
            del args[i]
    if "--from" in args:  # continual fine-tuning: the same as --continual.from_run RUN_DIR
        i = args.index("--from")
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise InputError("train: --from needs the finished run directory to continue from.")
        args[i] = "--continual.from_run"
    run = train(config, overrides=parse_overrides(args), resume=resume)
    _print_headline(run)
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    run = load(ns.run_dir)
    m = run.evaluate(ns.data)
    out = {k: v for k, v in m.items() if k != "confusion_matrix"}
    print(json.dumps(out, indent=2))
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    if bool(ns.input) == bool(ns.text):
        raise InputError("predict: give either --input FILE (- for standard input) or --text TEXT (repeatable).")
    if ns.pair and len(ns.pair) != len(ns.text or []):
        raise InputError(f"predict: {len(ns.pair)} --pair for {len(ns.text or [])} --text; give one --pair after each --text.")
    run = load(ns.run_dir)
    texts = list(zip(ns.text, ns.pair)) if ns.pair else ns.text
    if ns.explain:  # the same rows, each with its word attributions
        if ns.input == "-":
            raise InputError("predict --explain reads --input FILE or --text, not standard input.")
        chunks = _explained(run, texts, ns.input)
    elif ns.input == "-":
        chunks = run.predict_stream(sys.stdin)
    else:
        chunks = run.predict_file_chunks(ns.input) if ns.input else iter([run.predict(texts)])
    if ns.output and ns.output != "-":
        from lmtune.io import atomic_path
        n = 0
        with atomic_path(ns.output) as tmp, open(tmp, "w", encoding="utf-8") as fh:  # the old output stays until this is complete
            for rows in chunks:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                n += len(rows)
        print(f"wrote {n} predictions to {ns.output}", file=sys.stderr)
    else:
        for rows in chunks:
            sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            sys.stdout.flush()
    return 0


def _explained(run, texts: list | None, path: str | None, label: str | None = None, method: str = "auto", steps: int = 32):
    """Explained prediction rows of --text TEXTs, or of a file (read and checked whole first), 64 rows at a time."""
    if texts:
        yield run.explain(texts, label, method, steps)
        return
    examples = run.task.read_file(path, run.config, run.labels, False)
    for i in range(0, len(examples), 64):
        yield run.explain_examples(examples[i:i + 64], label, method, steps)


def cmd_explain(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    from lmtune.explain import report_section
    if ns.text and (ns.input or ns.data):
        raise InputError("explain: give --text TEXT (repeatable) or --input FILE, or neither to explain the run's test split.")
    if ns.pair and len(ns.pair) != len(ns.text or []):
        raise InputError(f"explain: {len(ns.pair)} --pair for {len(ns.text or [])} --text; give one --pair after each --text.")
    run = load(ns.run_dir, backend=ns.backend)
    if ns.text or ns.input:
        texts = list(zip(ns.text, ns.pair)) if ns.pair else ns.text
        for rows in _explained(run, texts, ns.input, ns.label, ns.method, ns.steps):
            sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return 0
    result = run.explain_report(ns.data, ns.max_examples, ns.method, ns.steps, ns.share)
    print(json.dumps(result, indent=2, ensure_ascii=False) if ns.json else report_section(result))
    print(f"wrote {Path(ns.run_dir) / 'explain.json'}", file=sys.stderr)
    return 0


def cmd_fairness(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    from lmtune.fairness import report_section
    run = load(ns.run_dir)
    run.config.train.progress = "none"
    slices = [c.strip() for c in ns.slices.split(",") if c.strip()] if ns.slices else None
    result = run.fairness(ns.data, ns.split, ns.swap, slices)
    print(json.dumps(result, indent=2, ensure_ascii=False) if ns.json else report_section(result))
    print(f"wrote {Path(ns.run_dir) / 'fairness.json'}", file=sys.stderr)
    return 0


def cmd_ui(ns: argparse.Namespace) -> int:
    from lmtune.ui.app import UiSettings, check_binding, serve_ui, ui_token
    token = ui_token(ns.token_file)
    check_binding(ns.host, token)
    print(f"lmtune ui on http://{ns.host}:{ns.port}/ (runs: {ns.runs_dir}; Ctrl-C stops)", file=sys.stderr)
    serve_ui(UiSettings(runs_dir=ns.runs_dir, workdir=".", token=token), ns.host, ns.port)
    return 0


def cmd_audit(args: list[str]) -> int:
    from lmtune.audit import audit
    from lmtune.config import load_config
    from lmtune.tasks import get_task
    from lmtune.tasks.base import LABEL_NOISE
    strict = "--strict" in args
    args = [a for a in args if a != "--strict"]
    config = args.pop(0) if args and not args[0].startswith("--") else None
    cfg = load_config(config, parse_overrides(args))
    task = get_task(cfg.task)
    splits = task.read(cfg)
    findings = audit(splits) + task.audit_findings(splits)
    if cfg.data.label_noise_folds:
        task.require(LABEL_NOISE, "data.label_noise_folds")
        from lmtune.api import accelerator_for
        from lmtune.noise import find_label_issues, finding, out_of_fold_probs
        probs = out_of_fold_probs(cfg, task, splits.train, splits.labels, cfg.data.label_noise_folds,
                                  accelerator_for(cfg.train.precision))
        result = find_label_issues(splits.train, splits.labels, probs)
        findings.append({**finding(result, len(splits.train)), "candidates": result["flagged"]})
    print(json.dumps(findings, indent=2, ensure_ascii=False))
    worst = {f["severity"] for f in findings}
    print(f"{len(findings)} finding(s): " + ", ".join(f"{s} {sum(f['severity'] == s for f in findings)}"
                                                    for s in ("critical", "warning", "info") if s in worst), file=sys.stderr)
    return 1 if strict and "critical" in worst else 0


def cmd_pretrain(args: list[str]) -> int:
    from lmtune.config import load_config
    from lmtune.pretrain import pretrain, summary
    config = args.pop(0) if args and not args[0].startswith("--") else None
    print(summary(pretrain(load_config(config, parse_overrides(args)))))
    return 0


def _pop(args: list[str], flag: str, kind=str, default=None):
    """Take `--flag VALUE` (or a bare `--flag` when kind is bool) out of free-form override args."""
    if flag not in args:
        return default
    i = args.index(flag)
    if kind is bool:
        del args[i]
        return True
    if i + 1 >= len(args):
        raise InputError(f"{flag} needs a value.")
    try:
        value = kind(args[i + 1])
    except ValueError:
        raise InputError(f"{flag}: expected a {kind.__name__}, got {args[i + 1]!r}.") from None
    del args[i:i + 2]
    return value


def cmd_tune(args: list[str]) -> int:
    from lmtune.config import load_config
    from lmtune.search.tune import tune
    trials = _pop(args, "--trials", int)
    if trials is None:
        raise InputError("tune: give --trials N (the number of trials of the study, all workers together).")
    timeout, soup = _pop(args, "--timeout", float), _pop(args, "--soup", bool, False)
    prune, resume = not _pop(args, "--no-prune", bool, False), _pop(args, "--resume", bool, False)
    config = args.pop(0) if args and not args[0].startswith("--") else None
    result = tune(load_config(config, parse_overrides(args)), trials, timeout, prune, soup, resume)
    best = result["best"]
    print(json.dumps({"best_trial": best["number"], f"dev_{result['metric']}": best["dev"], "params": best["params"],
                      "complete": result["complete"], "pruned": result["pruned"], "run_dir": best["run_dir"]}, indent=2))
    return 0


def cmd_cv(args: list[str]) -> int:
    from lmtune.config import load_config
    from lmtune.search.combine import cv, render_cv
    folds = _pop(args, "--folds", int, 5)
    no_ensemble = _pop(args, "--no-ensemble", bool, False)
    config = args.pop(0) if args and not args[0].startswith("--") else None
    print(render_cv(cv(load_config(config, parse_overrides(args)), folds, not no_ensemble)))
    return 0


def cmd_ensemble(ns: argparse.Namespace) -> int:
    from lmtune.search.combine import ensemble
    print(json.dumps(ensemble(ns.run_dirs, ns.out, ns.weights, ns.dev), indent=2))
    return 0


def cmd_soup(ns: argparse.Namespace) -> int:
    from lmtune.search.combine import soup
    print(json.dumps(soup(ns.run_dirs, ns.out, ns.greedy), indent=2))
    return 0


def cmd_drift(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    from lmtune.drift import report_section
    run = load(ns.run_dir)
    run.config.train.progress = "none"
    result = run.drift(ns.data, ns.alpha, ns.max_examples, ns.permutations)
    print(json.dumps(result, indent=2, ensure_ascii=False) if ns.json else report_section(result))
    print(f"wrote {Path(ns.run_dir) / 'drift.json'}", file=sys.stderr)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from lmtune.results import render
    print(render(ns.run_dir))
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    from lmtune.artifacts import RunDir, model_meta, write_meta
    from lmtune.io import atomic_dir
    from lmtune.peft import merge
    out = Path(ns.out_dir)
    if out.exists():
        raise InputError(f"{out}: already exists; merge writes a new folder and never overwrites one.")
    run = load(ns.run_dir)
    merged = merge(run.model, run.config.peft.method)
    meta = model_meta(run.task, saved=RunDir(ns.run_dir).model, refresh_state=False, merged_from=str(ns.run_dir))
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)
    print(f"merged model: {out}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from lmtune.export.onnx import export_run
    if ns.format != "onnx":
        raise InputError(f"export: --format {ns.format!r} is not supported (onnx).")
    report = export_run(ns.run_dir, quantize=ns.quantize, prune=ns.prune, sample=ns.sample, recover_epochs=ns.recover_epochs)
    print(json.dumps(report, indent=2))
    return 0


def cmd_attack(ns: argparse.Namespace) -> int:
    from lmtune.api import load
    from lmtune.registry import attacks
    run = load(ns.run_dir)
    overrides = {k: v for k, v in (("budget", ns.budget), ("rate", ns.rate), ("max_examples", ns.max_examples),
                                   ("synonyms", ns.synonyms), ("seed", ns.seed)) if v is not None}
    if ns.methods:
        methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
        for m in methods:
            attacks.check(m, "attack: --methods")
        overrides["methods"] = methods
    for key in ("budget", "rate"):
        if key in overrides and not 0 < overrides[key] <= 1:
            raise InputError(f"attack: --{key} must be in (0, 1], got {overrides[key]}.")
    result = run.attack(ns.data, **overrides)
    print(json.dumps({k: v for k, v in result.items()}, indent=2, ensure_ascii=False))
    print(f"wrote {Path(ns.run_dir) / 'robustness.json'}", file=sys.stderr)
    return 0


def cmd_init(ns: argparse.Namespace) -> int:
    from lmtune.io import write_text
    from lmtune.scaffold import inspect, render
    out = Path(ns.output or "lmtune.yaml")
    if out.exists() and not ns.force:
        raise InputError(f"{out}: already exists; give --output NEW.yaml or --force to replace it.")
    info = inspect(ns.data_file)
    text = render(info, ns.task)
    write_text(out, text)
    print(json.dumps({k: v for k, v in info.items() if k != "file"}, indent=2, ensure_ascii=False), file=sys.stderr)
    print(f"wrote {out}: check the lines marked 'guess', then `lmtune train {out}`", file=sys.stderr)
    return 0


def cmd_runs(ns: argparse.Namespace) -> int:
    from lmtune.runs import format_runs, list_runs
    rows = list_runs(ns.dir)
    print(json.dumps(rows, indent=2) if ns.json else format_runs(rows))
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from lmtune.runs import compare, format_compare
    c = compare(ns.run_a, ns.run_b)
    print(json.dumps(c, indent=2) if ns.json else format_compare(c))
    return 0


def cmd_push(ns: argparse.Namespace) -> int:
    from lmtune.hub import push
    print(f"pushed: {push(ns.run_dir, ns.repo_id, ns.private)}")
    return 0


def cmd_completion(ns: argparse.Namespace) -> int:
    import shtab
    print(shtab.complete(build_parser(), shell=ns.shell))
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    print(describe_fields())
    return 0


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_chat(ns: argparse.Namespace) -> int:
    """An interactive terminal chat with a generation run: each reply streams as it is generated, with
    the decoding chosen on dev; the conversation so far is the prompt (the tokenizer's chat template)."""
    from transformers import TextStreamer

    from lmtune.api import load
    from lmtune.tasks.base import GENERATE
    run = load(ns.run_dir)
    run.task.require(GENERATE, "chat")
    run.config.train.progress = "none"
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    print(f"chat with {Path(ns.run_dir).name}: an empty line or /exit ends, /reset starts over", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        if line == "/reset":
            history = history[:1] if ns.system else []
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(run.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = run.generate_examples([run.task.from_messages(history)], max_new_tokens=ns.max_new_tokens, streamer=streamer)[0]
        if not out["finished"]:
            print(f"[stopped at {out['tokens']} tokens]", file=sys.stderr)
        history.append({"role": "assistant", "content": out["text"]})
    return 0


def cmd_search(ns: argparse.Namespace) -> int:
    """A retrieval run's best documents for each query: one JSON line {query, results} per query."""
    from lmtune.api import load
    if not ns.query and not ns.corpus:
        raise InputError("search: give --query TEXT (repeatable), and/or --corpus FILE to (re)build the run's index.")
    run = load(ns.run_dir)
    if ns.corpus:
        n = run.build_index(ns.corpus)
        print(f"index: {n} documents from {ns.corpus} written to {Path(ns.run_dir) / 'index'}", file=sys.stderr)
    if ns.query:
        reranker = load(ns.reranker) if ns.reranker else None
        for q, rows in zip(ns.query, run.search(ns.query, ns.k, reranker=reranker, depth=ns.rerank_depth,
                                                rerank_label=ns.rerank_label)):
            print(json.dumps({"query": q, "results": rows}, ensure_ascii=False))
    return 0


def cmd_recommend(ns: argparse.Namespace) -> int:
    """The recommendation app (lmtune.apps.recommend): fit a config, or rank items for a user."""
    from lmtune.apps import recommend
    if ns.recommend_command == "fit":
        result = recommend.fit(ns.config)
        t = result["test"]
        print(f"run dir: {result['run_dir']}")
        for name in ("model", "popularity", "bm25"):
            print(f"test {name}: ndcg_10 {t[name]['ndcg_10']:.4f}  recall_10 {t[name]['recall_10']:.4f}  recall_20 {t[name]['recall_20']:.4f}")
        return 0
    if bool(ns.user) == bool(ns.history):
        raise InputError("recommend rank: give either --user USER or --history ITEM,ITEM,...")
    history = [x.strip() for x in ns.history.split(",") if x.strip()] if ns.history else None
    for row in recommend.rank(ns.run_dir, ns.user, history, ns.k):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def cmd_assistant(ns: argparse.Namespace) -> int:
    """The customer-service assistant app (lmtune.apps.assistant): serve it, or measure its routing on a labeled file."""
    from lmtune.apps import assistant
    cfg = assistant.load_config(ns.config)
    if ns.assistant_command == "evaluate":
        result = assistant.Assistant(cfg).evaluate(ns.data)
        print(json.dumps(result))
        return 0
    from lmtune.apps.assistant.server import serve
    from lmtune.serve.app import ServeSettings
    if ns.no_auth and ns.host not in LOCAL_HOSTS:
        raise InputError(f"assistant serve: --no-auth on {ns.host} would let anyone on the network use it. Bind to 127.0.0.1.")
    serve(cfg, ServeSettings(run_dir=cfg.intents, key_file=ns.api_key_file, no_auth=ns.no_auth, max_chars=ns.max_chars,
                             max_body_bytes=ns.max_body_bytes), ns.host, ns.port)
    return 0


def cmd_monitor(ns: argparse.Namespace) -> int:
    """The news monitor app (lmtune.apps.monitor): process the watched folder once, or serve and keep polling it."""
    from lmtune.apps import monitor
    cfg, rules = monitor.load_config(ns.config)
    mon = monitor.Monitor(cfg, rules)
    if ns.once:
        print(json.dumps(mon.process_folder()))
        return 0
    from lmtune.apps.monitor.server import serve
    from lmtune.serve.app import ServeSettings
    if ns.no_auth and ns.host not in LOCAL_HOSTS:
        raise InputError(f"monitor: --no-auth on {ns.host} would let anyone on the network use it. Bind to 127.0.0.1.")
    serve(mon, ServeSettings(run_dir=cfg.sentiment, key_file=ns.api_key_file, no_auth=ns.no_auth), ns.host, ns.port)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from lmtune.serve.app import ServeSettings, create_app, serve
    if ns.no_auth and ns.host not in LOCAL_HOSTS and not ns.insecure:
        raise InputError(f"serve: --no-auth on {ns.host} would let anyone on the network use the model. Bind to "
                         "127.0.0.1, configure API keys, or add --insecure if you really mean it.")
    settings = ServeSettings(run_dir=ns.run_dir, backend=ns.backend, key_file=ns.api_key_file, no_auth=ns.no_auth,
                             max_batch_size=ns.max_batch_size, max_wait_ms=ns.max_wait_ms, max_queue=ns.max_queue,
                             max_texts=ns.max_texts, max_chars=ns.max_chars, max_body_bytes=ns.max_body_bytes, threads=ns.threads,
                             header_timeout_s=ns.header_timeout, body_timeout_s=ns.body_timeout, max_connections=ns.max_connections,
                             explain_per_minute=ns.explain_per_minute, max_new_tokens=ns.max_new_tokens)
    if ns.workers == 1:
        create_app(settings)  # fail fast on a bad run dir or missing keys, before uvicorn starts
    serve(settings, ns.host, ns.port, ns.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtune", description="Fine-tune, evaluate and serve pretrained language models.")
    p.add_argument("--version", action="version", version=f"lmtune {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune from a config file", description=TRAIN_HELP + describe_fields(),
                       formatter_class=argparse.RawDescriptionHelpFormatter, add_help=True)
    t.add_argument("config", nargs="?", help="YAML config file")
    d = sub.add_parser("demo", help="train the packaged MiniLM on the bundled review data",
                       description="Runs `lmtune train` on the bundled demo config; flags override it.")
    d.add_argument("--output_dir", default="runs")
    e = sub.add_parser("evaluate", help="metrics of a trained run on a labeled file")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="labeled file with the run's text/label columns")
    pr = sub.add_parser("predict", help="predict with a trained run (any task); one JSON line per input",
                        description="Predictions as JSONL: labels, spans, scores or answers with their probabilities, "
                                    "intervals or abstentions, as the run's task gives them.")
    pr.add_argument("run_dir")
    pr.add_argument("--input", help="file with the run's columns (CSV/TSV/JSONL/parquet), or - for standard input: one JSON "
                                    "object or one plain text per line, read and predicted as it streams")
    pr.add_argument("--text", action="append", help="a text to predict on (repeatable)")
    pr.add_argument("--pair", action="append", help="the second text of the pair, for a model trained on pairs (one per --text)")
    pr.add_argument("--output", help="write JSONL to this file (written whole, then renamed); - or absent: standard output")
    pr.add_argument("--explain", action="store_true", help="add word attributions for the predicted label (see lmtune explain)")
    xp = sub.add_parser("explain", help="which words drove a prediction (Integrated Gradients), and how faithful that is",
                        description="With --text/--input: predictions with word attributions as JSONL. Without: explains the "
                                    "run's test split (or --data FILE): the words that drive each label, coloured examples, "
                                    "and faithfulness (comprehensiveness / sufficiency vs random words and attention); writes "
                                    "RUN_DIR/explain.json and an Explanations section in report.md.")
    xp.add_argument("run_dir")
    xp.add_argument("--text", action="append", help="a text to explain (repeatable)")
    xp.add_argument("--pair", action="append", help="the second text of the pair, for a model trained on pairs (one per --text)")
    xp.add_argument("--input", help="file with the run's columns: every row explained (JSONL out)")
    xp.add_argument("--data", help="labeled file to analyse instead of the run's test split")
    xp.add_argument("--label", help="explain this label instead of the predicted one")
    xp.add_argument("--method", choices=["auto", "ig", "occlusion"], default="auto",
                    help="auto: Integrated Gradients on the torch backend, occlusion (word removal) on ONNX")
    xp.add_argument("--backend", default="torch", choices=backends.names())
    xp.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps")
    xp.add_argument("--max-examples", type=int, default=300, help="examples analysed (a seeded sample)")
    xp.add_argument("--share", type=float, default=0.2, help="share of top words for the faithfulness measures")
    xp.add_argument("--json", action="store_true", help="print the whole analysis as JSON")
    ui = sub.add_parser("ui", help="a local web dashboard: runs, run pages, compare, try it, train from the browser",
                        description="Serves the dashboard from the installed package (no internet needed). Binds to "
                                    "127.0.0.1; another --host needs a token (LMTUNE_UI_TOKEN or --token-file). Files are "
                                    "picked and uploaded under the current directory.")
    ui.add_argument("runs_dir", nargs="?", default="runs", help="the output_dir holding the runs (default: runs)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--token-file", help="file whose first line is the token")
    fa = sub.add_parser("fairness", help="per-slice metrics with intervals, and counterfactual term swaps (he <-> she ...)",
                        description="Slices: accuracy per value of each --slices column (default data.slice_columns), the gap to "
                                    "overall with a 95%% bootstrap interval, significantly worse slices flagged. --swap en|zh|FILE: "
                                    "swaps gendered terms (built-in English / Chinese lists, or a CSV whose header names the "
                                    "two groups and whose rows are term pairs) and reports how many predictions change. "
                                    "Writes RUN_DIR/fairness.json and report.md sections.")
    fa.add_argument("run_dir")
    fa.add_argument("--data", help="labeled file with the run's columns (default: the run's --split)")
    fa.add_argument("--split", choices=["test", "dev"], default="test")
    fa.add_argument("--swap", help="en, zh, or a CSV/TSV file of term pairs (header: the two groups)")
    fa.add_argument("--slices", help="comma-separated columns of the data (default: data.slice_columns)")
    fa.add_argument("--json", action="store_true")
    au = sub.add_parser("audit", help="check the data of a config: balance, duplicates, conflicts, leakage",
                        description="lmtune audit CONFIG.yaml [--strict] [--section.key VALUE ...]: findings as JSON; "
                                    "--strict exits 1 when any finding is critical. --data.label_noise_folds 5 adds "
                                    "label-noise candidates (confident learning on 5-fold out-of-fold predictions).")
    au.add_argument("config", nargs="?")
    rp = sub.add_parser("report", help="render RUN_DIR/report.md again from RUN_DIR/results.json")
    rp.add_argument("run_dir")
    mg = sub.add_parser("merge", help="fold a LoRA/AdaLoRA/IA3 adapter into a standalone model folder")
    mg.add_argument("run_dir")
    mg.add_argument("out_dir")
    ex = sub.add_parser("export", help="export a run to ONNX (optionally int8 / pruned), verified against PyTorch",
                        description="Writes RUN_DIR/export/ (model.onnx, model.int8.onnx, tokenizer, export.json with the "
                                    "max logit difference and the dev metric before/after).")
    ex.add_argument("run_dir")
    ex.add_argument("--format", default="onnx")
    ex.add_argument("--quantize", choices=["int8"], help="also write a dynamically int8-quantized model")
    ex.add_argument("--prune", help="magnitude:AMOUNT zeroes that share of each encoder weight matrix (smaller file); "
                                    "ffn:AMOUNT,heads:AMOUNT removes that share of feed-forward neurons / attention heads "
                                    "by importance (faster on every backend), then distils from the unpruned model")
    ex.add_argument("--recover-epochs", type=int, default=1,
                    help="epochs of distillation on the run's train split after ffn/heads pruning (0: none)")
    ex.add_argument("--sample", type=int, default=256, help="dev examples for the logit comparison")
    ch = sub.add_parser("chat", help="chat in the terminal with a generation run (replies stream as they are generated)")
    ch.add_argument("run_dir")
    ch.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply at most (default: the run's)")
    ch.add_argument("--system", default=None, help="a system message to start the conversation with")
    se = sub.add_parser("search", help="a retrieval run's best documents for a query, from the run's index (or a new corpus)")
    se.add_argument("run_dir")
    se.add_argument("--query", action="append", default=[], help="a query (repeatable)")
    se.add_argument("--k", type=int, default=10, help="documents per query")
    se.add_argument("--corpus", default=None, help="embed this file's documents (retrieval.corpus_column) as the run's new index first")
    se.add_argument("--reranker", default=None, metavar="PAIR_RUN", help="re-order the index's best with this pair run (a cross-encoder)")
    se.add_argument("--rerank-depth", type=int, default=50, help="candidates per query the reranker re-orders")
    se.add_argument("--rerank-label", default=None, help="the pair run's label that means relevant (default: 1/true/yes/relevant ...)")
    rc = sub.add_parser("recommend", help="text-based recommendation app: fit a two-tower model on interactions, rank items for a user")
    rsub = rc.add_subparsers(dest="recommend_command", required=True)
    rf = rsub.add_parser("fit", help="train, then compare with popularity and BM25 on a leave-last-out split (recommend.json)")
    rf.add_argument("config", help="the app's YAML (see lmtune/apps/recommend/example.yaml)")
    rr = rsub.add_parser("rank", help="the top items for a user (or a list of item ids), items already taken excluded")
    rr.add_argument("run_dir")
    rr.add_argument("--user", default=None)
    rr.add_argument("--history", default=None, help="comma-separated item ids, oldest first")
    rr.add_argument("--k", type=int, default=10)
    asp = sub.add_parser("assistant", help="customer-service assistant app: intent routing, FAQ answers, hand-off (see Applications)")
    asub = asp.add_subparsers(dest="assistant_command", required=True)
    aserve = asub.add_parser("serve", help="POST /v1/chat, a chat page at /, /healthz, /metrics; API keys as lmtune serve")
    aserve.add_argument("config", help="the app's YAML (see lmtune/apps/assistant/example.yaml)")
    aserve.add_argument("--host", default="127.0.0.1")
    aserve.add_argument("--port", type=int, default=8010)
    aserve.add_argument("--api-key-file", help="file with one API key per line (else LMTUNE_API_KEYS)")
    aserve.add_argument("--no-auth", action="store_true", help="serve without API keys (localhost only)")
    aserve.add_argument("--max-chars", type=int, default=2000, help="characters per message")
    aserve.add_argument("--max-body-bytes", type=int, default=100_000)
    aev = asub.add_parser("evaluate", help="routing accuracy on a labeled file (right answer, or hand-off for out-of-scope)")
    aev.add_argument("config")
    aev.add_argument("--data", required=True, help="labeled messages in the intent run's columns")
    mo = sub.add_parser("monitor", help="news sentiment monitor app: companies, sentiment, alert rules, a page (see Applications)")
    mo.add_argument("config", help="the app's YAML (see lmtune/apps/monitor/example.yaml)")
    mo.add_argument("--once", action="store_true", help="process the watched folder once and exit (no server)")
    mo.add_argument("--host", default="127.0.0.1")
    mo.add_argument("--port", type=int, default=8020)
    mo.add_argument("--api-key-file", help="file with one API key per line (else LMTUNE_API_KEYS)")
    mo.add_argument("--no-auth", action="store_true", help="serve without API keys (localhost only)")
    sv = sub.add_parser("serve", help="serve a run over HTTP (FastAPI): /v1/predict (/v1/generate), /healthz, /readyz, /metrics",
                        description="API keys come from LMTUNE_API_KEYS (comma-separated) or --api-key-file; calls "
                                    "without a valid key get 401. Uses RUN_DIR/export (ONNX, int8 first) when present.")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    sv.add_argument("--backend", default="auto", choices=["auto", *backends.names()],
                    help="auto: the run's int8 ONNX export, else its fp32 one, else torch")
    sv.add_argument("--api-key-file", help="file with one API key per line")
    sv.add_argument("--no-auth", action="store_true", help="serve without API keys (local experiments only; "
                                                           "refused on a non-local --host unless --insecure)")
    sv.add_argument("--insecure", action="store_true", help="allow --no-auth on a non-local --host")
    sv.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's head")
    sv.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send the body after the head")
    sv.add_argument("--max-connections", type=int, default=1000,
                    help="open connections (kept below the open-file limit); over it the oldest waiting one is dropped")
    sv.add_argument("--max-batch-size", type=int, default=32, help="texts per model call")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    sv.add_argument("--max-queue", type=int, default=2048, help="texts waiting before requests get 503")
    sv.add_argument("--max-texts", type=int, default=64, help="texts per request")
    sv.add_argument("--max-chars", type=int, default=2000, help="characters per text")
    sv.add_argument("--explain-per-minute", type=int, default=30,
                    help="/v1/predict?explain=true requests per minute and API key (0: explanations off)")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000)
    sv.add_argument("--max-new-tokens", type=int, default=256, help="generation runs: the most tokens one /v1/generate "
                                                                    "request may ask for")
    sv.add_argument("--threads", type=int, help="model threads per worker (default: cores / workers)")
    at = sub.add_parser("attack", help="robustness report: accuracy under typo / synonym / word-importance attacks",
                        description="Attacks a trained run on --data (default: its dev split); writes RUN_DIR/robustness.json "
                                    "and a Robustness section in report.md. Entities, negations and numbers are never changed.")
    at.add_argument("run_dir")
    at.add_argument("--data", help="labeled file with the run's columns (default: the run's dev split)")
    at.add_argument("--methods", help="comma-separated: typo,synonym,search (default: all three)")
    at.add_argument("--rate", type=float, help="typo/synonym: share of words changed (default 0.2)")
    at.add_argument("--budget", type=float, help="search: most words changed, as a share (default 0.1)")
    at.add_argument("--synonyms", choices=["auto", "wordnet", "embedding"])
    at.add_argument("--max-examples", type=int)
    at.add_argument("--seed", type=int)
    sub.add_parser("config", help="list every config key with its default and meaning")
    it = sub.add_parser("init", help="inspect a labeled file and write a commented config to start from")
    it.add_argument("data_file")
    it.add_argument("--task", help="the task, when the guess from the columns is wrong")
    it.add_argument("--output", help="config file to write (default lmtune.yaml)")
    it.add_argument("--force", action="store_true", help="replace an existing config file")
    rs = sub.add_parser("runs", help="list runs: task, model, date, headline metrics, status")
    rs.add_argument("dir", nargs="?", default="runs", help="the output_dir holding the runs (default: runs)")
    rs.add_argument("--json", action="store_true")
    cp = sub.add_parser("compare", help="two runs side by side: config differences and metric differences")
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--json", action="store_true")
    pu = sub.add_parser("push", help="upload RUN_DIR/model (weights, tokenizer, model card) to a Hugging Face Hub repo",
                        description="Needs a token (HF_TOKEN or `hf auth login`); creates the repo when missing.")
    pu.add_argument("run_dir")
    pu.add_argument("repo_id")
    pu.add_argument("--private", action="store_true")
    dr = sub.add_parser("drift", help="does new data differ from a run's training data? labels, inputs, confidence, vocabulary",
                        description="Compares --data with the run's training data (re-read from its recorded sources): "
                                    "label shift (chi-squared), input shift (MMD on the fine-tuned encoder's embeddings, "
                                    "permutation p-value; domain-classifier AUC), confidence shift, vocabulary and length. "
                                    "Writes RUN_DIR/drift.json and a Drift section in report.md.")
    dr.add_argument("run_dir")
    dr.add_argument("--data", required=True, help="the new file, with the run's text column (labels optional)")
    dr.add_argument("--alpha", type=float, default=0.05, help="significance level of the tests")
    dr.add_argument("--max-examples", type=int, default=1000, help="examples sampled from each side")
    dr.add_argument("--permutations", type=int, default=500)
    dr.add_argument("--json", action="store_true", help="print the whole result as JSON")
    sub.add_parser("pretrain", help="continue masked-LM pretraining on unlabeled in-domain text (pretrain.* keys)",
                   description="lmtune pretrain CONFIG.yaml [--pretrain.files '[a.txt]'] [--section.key VALUE ...]: writes "
                               "OUTPUT_DIR/RUN/model (use it as model.name) and pretrain.json with held-out perplexity "
                               "before and after.")
    sub.add_parser("tune", help="hyperparameter search (Optuna TPE, pruning); each trial a run dir under OUTPUT_DIR/RUN_NAME",
                   description="lmtune tune CONFIG.yaml --trials N [--timeout S] [--soup] [--no-prune] [--resume] "
                               "[--section.key VALUE ...]: tune.space (default by model width), tune.pruner, tune.storage. "
                               "Start it N times to run N workers on one study. --resume re-queues trials a stopped "
                               "worker left running. Writes study.json, study.md, history.png, best.yaml.")
    sub.add_parser("cv", help="stratified (or grouped) k-fold cross-validation, and an ensemble of the fold models",
                   description="lmtune cv CONFIG.yaml [--folds 5] [--no-ensemble] [--section.key VALUE ...]: folds over "
                               "train + dev (data.group_column keeps groups together); writes OUTPUT_DIR/RUN_NAME (default "
                               "cv)/fold-K, cv.json, cv.md, oof.jsonl and ensemble/.")
    en = sub.add_parser("ensemble", help="a run dir that averages its members' calibrated probabilities")
    en.add_argument("run_dirs", nargs="+")
    en.add_argument("--out", required=True, help="the new run directory")
    en.add_argument("--weights", choices=["uniform", "dev"], default="uniform",
                    help="dev: weights that minimise the dev log-loss (needs a shared dev split or --dev)")
    en.add_argument("--dev", help="labeled file to fit weights, temperature and abstention on (default: the members' shared dev)")
    so = sub.add_parser("soup", help="average the weights of runs of one base model into one run dir (model soup)")
    so.add_argument("run_dirs", nargs="+")
    so.add_argument("--out", required=True, help="the new run directory")
    so.add_argument("--greedy", action="store_true", help="add a run (best dev first) only if it improves the soup's dev metric")
    co = sub.add_parser("completion", help="print a shell completion script: eval \"$(lmtune completion bash)\"")
    co.add_argument("shell", choices=["bash", "zsh"])
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lmtune")
    except PackageNotFoundError:
        return "unknown (not installed)"


# subcommand -> function(argparse.Namespace) -> exit status; train, demo, audit, pretrain, tune and cv take free-form
# --section.key overrides and are parsed before argparse sees them
COMMANDS = {"evaluate": cmd_evaluate, "predict": cmd_predict, "merge": cmd_merge, "report": cmd_report, "export": cmd_export,
            "attack": cmd_attack, "serve": cmd_serve, "config": cmd_config, "init": cmd_init, "runs": cmd_runs,
            "compare": cmd_compare, "push": cmd_push, "completion": cmd_completion, "drift": cmd_drift, "explain": cmd_explain,
            "fairness": cmd_fairness, "ui": cmd_ui, "chat": cmd_chat, "search": cmd_search,
            "recommend": cmd_recommend, "assistant": cmd_assistant, "monitor": cmd_monitor,
            "ensemble": cmd_ensemble, "soup": cmd_soup}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lmtune").setLevel(logging.INFO)
    parser = build_parser()
    try:
        if argv and argv[0] == "audit" and not any(a in ("-h", "--help") for a in argv):
            return cmd_audit(argv[1:])
        free_form = {"pretrain": cmd_pretrain, "tune": cmd_tune, "cv": cmd_cv}  # take --section.key overrides
        if argv and argv[0] in free_form and not any(a in ("-h", "--help") for a in argv):
            return free_form[argv[0]](argv[1:])
        if argv and argv[0] in ("train", "demo") and not any(a in ("-h", "--help") for a in argv):
            rest = argv[1:]
            config = str(DEMO_CONFIG) if argv[0] == "demo" else None
            if argv[0] == "train" and rest and not rest[0].startswith("--"):
                config = rest.pop(0)
            return cmd_train(rest, config)
        ns = parser.parse_args(argv)
        return COMMANDS[ns.command](ns)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
