"""benchmarks/device_check.sh without a GPU: --dry-run lists every step and passes; the driver's table, test
rows, failure rows and share of the GPU's peak from known inputs."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import device_check
from benchmarks.device_check import Row, Step, figure, format_table, junit_rows, peak_share_row, step_rows
from tests.conftest import REPO_ROOT

STEP_NAMES = ["cuda-tests", "train-amp", "model-steps", "sam-backends", "predict"]


def test_dry_run_lists_every_step_and_exits_0_without_a_gpu():
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and "(<=" in line]
    assert listed == STEP_NAMES
    assert "pytest -m cuda" in proc.stdout and "bench_train.py --quick --device cuda" in proc.stdout
    assert "bench_masks.py --device cuda --half" in proc.stdout and "--backends vit_b,mobile_sam.pt,yolo_seg" in proc.stdout
    assert "device_check.md" in proc.stdout


def test_an_unknown_argument_is_refused():
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--fast"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


def test_the_steps_fit_the_8_minute_budget():
    assert [s.name for s in device_check.STEPS] == STEP_NAMES
    assert sum(s.timeout_s for s in device_check.STEPS) <= device_check.BUDGET_S == 480


def test_table_is_one_markdown_table_with_escaped_cells():
    rows = [Row("train-amp", "unetpp training images/s", "1234.5 img/s", "a | b\nc"), Row("predict", "x", "failed")]
    assert format_table(rows) == ("| step | figure | value | note |\n|---|---|---|---|\n"
                                  "| train-amp | unetpp training images/s | 1234.5 img/s | a \\| b c |\n"
                                  "| predict | x | failed |  |\n")


@pytest.mark.parametrize("value, unit, text", [(1234.567, "img/s", "1234.6 img/s"), (0.012345, "s", "0.0123 s"),
                                               (12.345, "ms", "12.3 ms"), ("GPU", "", "GPU")])
def test_values_are_formatted_to_3_significant_figures_at_least(value, unit, text):
    assert device_check.format_value(value, unit) == text


def test_junit_rows_name_each_test_with_its_outcome(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_cuda" name="test_amp" time="3.21"/>'
        '<testcase classname="tests.test_cuda" name="test_ddp" time="0"><skipped message="needs 2 GPUs"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_half" time="1"><failure message="assert 1 == 2&#10;more">'
        'trace</failure></testcase></testsuite></testsuites>')
    rows, failed = junit_rows(junit)
    assert failed == 1
    assert rows == [Row("cuda-tests", "test_amp", "passed", "3.2 s"),
                    Row("cuda-tests", "test_ddp", "skipped", "needs 2 GPUs"),
                    Row("cuda-tests", "test_half", "FAILED", "assert 1 == 2")]


def test_share_of_peak_uses_111_gflop_per_trained_image(monkeypatch):
    monkeypatch.delenv("DEVICE_CHECK_PEAK_TFLOPS", raising=False)
    figures = [figure("unetpp training images/s", 1000.0, "img/s", key="train_images_per_s")]
    row = peak_share_row(figures, "NVIDIA H200")
    assert row.value == "11.2%"  # 1000 img/s x 110.7 GFLOP / 989 TFLOP/s, the issue's ~11 %
    assert peak_share_row(figures, "NVIDIA H100 PCIe").value == "14.6%"
    assert peak_share_row(figures, "Some Future GPU").value == "n/a"
    monkeypatch.setenv("DEVICE_CHECK_PEAK_TFLOPS", "100")
    assert peak_share_row(figures, "Some Future GPU").value == "110.7%"


def test_a_failed_or_timed_out_step_is_a_row_and_only_cuda_tests_fail_the_check(tmp_path):
    logs = tmp_path / "out" / "device_check_logs"
    logs.mkdir(parents=True)
    bench = Step("predict", "predict frames/s", (), 10)
    figures, junit, log = logs / "predict.json", logs / "predict.junit.xml", logs / "predict.log"
    rows, failed = step_rows(bench, None, figures, junit, log, 70, "NVIDIA H200")
    assert not failed and rows == [Row("predict", "predict frames/s", "failed",
                                       "timed out after 70 s; log: device_check_logs/predict.log")]
    device_check.write_figures(figures, [figure("predict pipelined", 512.34, "frames/s", "2.00x the plain loop")])
    rows, failed = step_rows(bench, 0, figures, junit, log, 70, "NVIDIA H200")
    assert rows == [Row("predict", "predict pipelined", "512.3 frames/s", "2.00x the plain loop")]

    tests = Step("cuda-tests", "pytest -m cuda", (), 10)
    rows, failed = step_rows(tests, 1, figures, junit, log, 150, "NVIDIA H200")  # pytest died before its junit
    assert failed and rows[0].value == "FAILED" and "exit status 1" in rows[0].note
    junit.write_text('<testsuite><testcase name="test_amp" time="1"/></testsuite>')
    rows, failed = step_rows(tests, 0, figures, junit, log, 150, "NVIDIA H200")
    assert not failed and rows == [Row("cuda-tests", "test_amp", "passed", "1.0 s")]


def test_output_goes_to_out_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert device_check.output_file(None) == tmp_path / "device_check.md"
    monkeypatch.delenv("OUT")
    assert device_check.output_file(None) == Path(REPO_ROOT) / "reports" / "device_check.md"
