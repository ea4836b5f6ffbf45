"""Memory of `lmtune predict RUN --input - --output -` over a long stdin stream, against the same
command on one text (the model's own footprint), one process each, measured by the kernel.

The run: the demo (packaged MiniLM on the bundled reviews, 1 epoch) unless --run is given. The
stream: --lines lines (default 200,000) written to the command's stdin as it reads them, half JSON
objects with the text column and half plain texts, review-like sentences of 5-40 words; its stdout
goes through a counter (every prediction line is parsed). Peak RSS of each command is its own
ru_maxrss, from os.wait4 on that child (the kernel's high-water mark of its resident memory); this
process imports no model library and trains the demo in a child, so it adds only its own few MB.
Criterion (issue 22): stream peak - footprint <= 300 MB.

Last line JSON: {"predict_stream": {"lines": N, "footprint_mb": F, "peak_mb": P, "over_footprint_mb": D,
"seconds": S, "lines_per_s": R}}
Usage: python bench/predict_stream.py [--lines 200000] [--run RUN_DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("the battery lasts long and the screen is bright but the speaker is weak and support never answered my "
         "email about the refund so I returned it after a week of daily use which was disappointing overall").split()


def demo_run(out: Path) -> Path:
    """The demo, trained in a child process: this process must stay small, because a child's ru_maxrss
    starts from its parent's resident size at fork (Linux carries it over exec)."""
    proc = subprocess.run([sys.executable, "-m", "lmtune", "demo", "--output_dir", str(out), "--train.epochs", "1",
                           "--train.progress", "none"], capture_output=True, text=True, check=True)
    return Path(proc.stdout.split("run dir: ", 1)[1].splitlines()[0])


def wait_peak_mb(proc: subprocess.Popen) -> tuple[int, float]:
    """Exit status and peak RSS of this child alone (ru_maxrss is in KiB on Linux)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def feed(stdin, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    try:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
            stdin.write((json.dumps({"text": text}) if i % 2 else text) + "\n")
    finally:
        stdin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--run", help="a finished run (default: train the demo for 1 epoch)")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(ns.run) if ns.run else demo_run(Path(tmp))
        cmd = [sys.executable, "-m", "lmtune", "predict", str(run_dir)]
        one = subprocess.Popen([*cmd, "--text", "works as described"], stdout=subprocess.PIPE, text=True)
        assert json.loads(one.stdout.read())["label"]
        rc, footprint = wait_peak_mb(one)
        assert rc == 0
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--input", "-", "--output", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        writer = threading.Thread(target=feed, args=(proc.stdin, ns.lines))
        writer.start()
        count = sum(1 for line in proc.stdout if json.loads(line)["label"])
        writer.join()
        err = proc.stderr.read()
        rc, peak = wait_peak_mb(proc)
        if rc != 0:
            raise SystemExit(f"predict failed: {err[-2000:]}")
        seconds = time.perf_counter() - t0
    assert count == ns.lines, (count, ns.lines)
    print(f"predict one text: peak RSS {footprint:.0f} MB | predict {ns.lines} stdin lines: peak RSS {peak:.0f} MB "
          f"(+{peak - footprint:.0f} MB over the footprint; criterion <= 300) in {seconds:.1f}s, {ns.lines / seconds:.0f} lines/s",
          flush=True)
    print(json.dumps({"predict_stream": {"lines": ns.lines, "footprint_mb": round(footprint, 1), "peak_mb": round(peak, 1),
                                         "over_footprint_mb": round(peak - footprint, 1), "seconds": round(seconds, 1),
                                         "lines_per_s": round(ns.lines / seconds, 1)}}))


if __name__ == "__main__":
    main()
