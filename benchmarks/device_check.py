"""The GPU check (driver of benchmarks/device_check.sh): every CUDA test and the benchmarks' short GPU mode in
one go, within an 8-minute budget, summed up in ONE Markdown table of figures.

    .venv/bin/python benchmarks/device_check.py [--dry-run] [--out FILE] [--budget-s 480]

Steps (each a subprocess with its own timeout, capped by what is left of the budget; a failed or timed-out
step is a row of the table, never the end of the check):
  cuda-tests   pytest -m cuda tests/test_cuda.py: AMP + channels-last epoch, NCCL DDP (>= 2 GPUs), masks with
               half, predict with autocast, ONNX Runtime's CUDA provider (when installed); one row per test
  train-amp    bench_train.py --quick: UNet++ (resnet34) training images/s at 256 px with AMP through
               charseg.train, the loader alone and the GPU alone (which one bounds it), share of bf16 peak
  model-steps  bench_models.py --amp: step time of every params.yaml model at its img_size (512)
  sam-backends bench_masks.py: labelled frames/s per backend (vit_b, MobileSAM, yolo_seg), half precision
  predict      bench_predict.py --amp: UNet++ at 512 on a 720p video, pipelined against a plain loop
Each benchmark writes its figures as JSON (--json, write_figures below); the driver only formats them.
Exit status: 1 when a CUDA test failed or the tests could not run, 2 when no GPU is visible, else 0.
This module imports nothing heavy at the top: --dry-run and the table code run without torch.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

REPO_ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the 8 minutes for the tests and benchmarks (the device print and install come before)
MIN_STEP_S = 20  # a step with less time than this left is not started

# UNet++ (resnet34) at 256x256: 18.45 GMACs forward (thop) = 36.9 GFLOP; backward ~2x forward: ~111 GFLOP
# per trained image. Only valid for that model at that size, which is what the train-amp step runs.
UNETPP_R34_256_TRAIN_GFLOP = 3 * 2 * 18.45
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of common GPUs, by a substring of torch's device name;
# first match wins, so the more specific names come first. DEVICE_CHECK_PEAK_TFLOPS overrides it.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0),
                    ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A6000", 155.0))


class Figure(TypedDict, total=False):
    """One measured figure, as a benchmark's --json file holds it."""
    figure: str          # what was measured, e.g. "unetpp train images/s (AMP, 256 px)"
    value: float | str   # the number (or a word: "GPU", "passed")
    unit: str            # "img/s", "ms", "frames/s", ...
    note: str            # how, or why it failed
    key: str             # a stable name the driver looks for (e.g. train_images_per_s); optional


def figure(name: str, value: float | str, unit: str = "", note: str = "", key: str = "") -> Figure:
    row = Figure(figure=name, value=value, unit=unit, note=note)
    if key:
        row["key"] = key
    return row


def write_figures(path: str | Path, figures: list[Figure]) -> None:
    """A benchmark's figures for the device check (its --json option); written atomically."""
    sys.path.insert(0, str(REPO_ROOT))
    from charseg.io import write_json

    write_json(Path(path), {"figures": figures})


@dataclass(frozen=True)
class Row:
    """One line of the table."""
    step: str
    figure: str
    value: str
    note: str = ""


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    args: tuple[str, ...]  # after the python interpreter; {figures}, {junit} and {workers} are filled in
    timeout_s: int


def loader_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


STEPS = (
    Step("cuda-tests", "pytest -m cuda tests/test_cuda.py (AMP train, NCCL DDP, masks half, predict autocast, ONNX CUDA)",
         ("-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py", "--junitxml", "{junit}"),
         150),
    Step("train-amp", "UNet++ r34 training images/s at 256 px, AMP, through charseg.train; loader and GPU bounds",
         ("benchmarks/bench_train.py", "--quick", "--device", "cuda", "--train-model", "unetpp", "--img-size", "256",
          "--batch-size", "64", "--frames", "1024", "--frame-size", "640x360", "--workers", "{workers}",
          "--epochs", "2", "--json", "{figures}"), 90),
    Step("model-steps", "train step time per model of params.yaml at img_size 512, AMP, channels-last",
         ("-m", "benchmarks.bench_models", "--device", "cuda", "--amp", "--iters", "5", "--json", "{figures}"), 70),
    Step("sam-backends", "labelled frames/s per backend (vit_b, MobileSAM, yolo_seg), half precision",
         ("benchmarks/bench_masks.py", "--device", "cuda", "--half", "--frames", "16",
          "--backends", "vit_b,mobile_sam.pt,yolo_seg", "--workers-frames", "0", "--json", "{figures}"), 100),
    Step("predict", "predict frames/s, UNet++ at 512 on a 720p video, AMP: pipelined vs a plain loop",
         ("benchmarks/bench_predict.py", "--device", "cuda", "--amp", "--models", "unetpp", "--img-size", "512",
          "--seconds", "4", "--size", "1280x720", "--batch-size", "16", "--repeats", "1", "--json", "{figures}"), 70),
)


def _cell(text: Any) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def format_value(value: float | str, unit: str = "") -> str:
    """Numbers to 3 significant figures at least (1234.5 -> 1234.5; 0.01234 -> 0.0123), then the unit."""
    if isinstance(value, float):
        text = f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def format_table(rows: list[Row]) -> str:
    lines = ["| step | figure | value | note |", "|---|---|---|---|"]
    lines += [f"| {_cell(r.step)} | {_cell(r.figure)} | {_cell(r.value)} | {_cell(r.note)} |" for r in rows]
    return "\n".join(lines) + "\n"


def figure_rows(step: str, figures: list[Figure]) -> list[Row]:
    return [Row(step, f["figure"], format_value(f["value"], f.get("unit", "")), f.get("note", "")) for f in figures]


def junit_rows(junit: Path) -> tuple[list[Row], int]:
    """One row per test of a pytest --junitxml file, and the number that failed or errored."""
    rows, failed = [], 0
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome, note = "passed", f"{float(case.get('time', 0)):.1f} s"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, failed = "FAILED", failed + 1
                note = (child.get("message") or child.tag).splitlines()[0][:200]
            elif child.tag == "skipped":
                outcome, note = "skipped", (child.get("message") or "")[:200]
        rows.append(Row("cuda-tests", case.get("name", "?"), outcome, note))
    return rows, failed


def peak_tflops(device_name: str) -> float | None:
    if os.environ.get("DEVICE_CHECK_PEAK_TFLOPS"):
        return float(os.environ["DEVICE_CHECK_PEAK_TFLOPS"])
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part in device_name), None)


def peak_share_row(figures: list[Figure], device_name: str) -> Row | None:
    """The share of the GPU's bf16 peak that the measured UNet++ training rate achieves."""
    rate = next((f["value"] for f in figures if f.get("key") == "train_images_per_s"), None)
    if not isinstance(rate, (int, float)):
        return None
    peak = peak_tflops(device_name)
    if peak is None:
        return Row("train-amp", "share of bf16 peak", "n/a",
                   f"peak of {device_name!r} unknown: set DEVICE_CHECK_PEAK_TFLOPS")
    share = rate * UNETPP_R34_256_TRAIN_GFLOP / (peak * 1000)
    return Row("train-amp", "share of bf16 peak", f"{share:.1%}",
               f"{rate:.0f} img/s x {UNETPP_R34_256_TRAIN_GFLOP:.0f} GFLOP/img vs {peak:g} TFLOP/s dense bf16 "
               f"({device_name}); target 1000 img/s")


def device_rows() -> tuple[list[Row], str | None]:
    """What torch sees; the first GPU's name (None: no GPU)."""
    import torch

    rows = [Row("device", "torch", torch.__version__, f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")]
    if not torch.cuda.is_available():
        return rows + [Row("device", "GPU", "none", "torch.cuda.is_available() is false")], None
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append(Row("device", f"cuda:{index}", props.name,
                        f"sm {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    return rows, torch.cuda.get_device_name(0)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_step(step: Step, python: str, logs: Path, timeout_s: float) -> tuple[int | None, Path, Path, Path]:
    """Run one step in its own process group (a timeout kills its workers too); (exit status or None on
    timeout, figures file, junit file, log file)."""
    figures, junit, log = logs / f"{step.name}.json", logs / f"{step.name}.junit.xml", logs / f"{step.name}.log"
    for stale in (figures, junit):
        stale.unlink(missing_ok=True)
    args = [a.format(figures=figures, junit=junit, workers=loader_workers()) for a in step.args]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([python, *args], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), figures, junit, log
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return None, figures, junit, log
        except BaseException:
            _kill_group(proc)
            raise


def step_rows(step: Step, status: int | None, figures: Path, junit: Path, log: Path, timeout_s: float,
              device_name: str) -> tuple[list[Row], bool]:
    """The table rows of a finished step, and whether it counts as a failed CUDA test."""
    where = f"log: {log.relative_to(log.parents[1])}"
    failure = (f"timed out after {timeout_s:.0f} s" if status is None else f"exit status {status}") + f"; {where}"
    if step.name == "cuda-tests":
        if not junit.is_file():
            return [Row(step.name, "pytest -m cuda", "FAILED", failure)], True
        rows, failed = junit_rows(junit)
        if status != 0 and not failed:
            rows.append(Row(step.name, "pytest -m cuda", "FAILED", failure))
        return rows, failed > 0 or status != 0
    rows = []
    if figures.is_file():
        try:
            found = json.loads(figures.read_text(encoding="utf-8"))["figures"]
            rows = figure_rows(step.name, found)
        except (ValueError, KeyError, TypeError) as err:  # a half-written or foreign file: the step failed
            found, failure = [], f"unreadable {figures.name} ({err}); {where}"
        share = peak_share_row(found, device_name) if step.name == "train-amp" else None
        rows += [share] if share else []
    if status != 0 or not rows:
        rows.append(Row(step.name, step.what, "failed", failure))
    return rows, False


def output_file(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ["OUT"]) / "device_check.md" if os.environ.get("OUT") else REPO_ROOT / "reports" / "device_check.md"


def dry_run(budget_s: int) -> None:
    print(f"device check, dry run: would run these steps within {budget_s} s, each in its own process:")
    for step in STEPS:
        args = " ".join(a.format(figures=f"<logs>/{step.name}.json", junit=f"<logs>/{step.name}.junit.xml",
                                 workers=loader_workers()) for a in step.args)
        print(f"  {step.name:13s} (<= {step.timeout_s:3d} s) {step.what}\n  {'':13s}  python {args}")
    print(f"and write one Markdown table to {output_file(None)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit 0 (no GPU needed)")
    parser.add_argument("--out", help="the table's file (default: $OUT/device_check.md, else reports/device_check.md)")
    parser.add_argument("--budget-s", type=int, default=BUDGET_S, help="seconds for all steps together")
    args = parser.parse_args(argv)
    if args.dry_run:
        dry_run(args.budget_s)
        return 0

    rows, device_name = device_rows()
    if device_name is None:
        print(format_table(rows) + "\nno CUDA GPU visible: nothing to check here (--dry-run lists the steps)",
              file=sys.stderr)
        return 2
    out = output_file(args.out)
    logs = out.parent / "device_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline, tests_failed = time.monotonic() + args.budget_s, True
    for step in STEPS:
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            rows.append(Row(step.name, step.what, "not run", f"the {args.budget_s} s budget was spent"))
            continue
        timeout_s = min(step.timeout_s, left)
        print(f"[device check] {step.name} (<= {timeout_s:.0f} s): {step.what}", flush=True)
        start = time.monotonic()
        status, figures, junit, log = run_step(step, sys.executable, logs, timeout_s)
        new_rows, failed = step_rows(step, status, figures, junit, log, timeout_s, device_name)
        rows += new_rows
        if step.name == "cuda-tests":
            tests_failed = failed
        print(f"[device check] {step.name}: {'done' if status == 0 else 'FAILED'} in "
              f"{time.monotonic() - start:.0f} s", flush=True)
    table = format_table(rows)
    sys.path.insert(0, str(REPO_ROOT))
    from charseg.io import write_text_atomic

    write_text_atomic(out, table)
    print(f"\n{table}\n(table: {out}; logs: {logs})")
    return 1 if tests_failed else 0


if __name__ == "__main__":
    sys.exit(main())
