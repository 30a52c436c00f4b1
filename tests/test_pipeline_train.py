"""The real `dvc` CLI on a copy of the repo, the whole pipeline: frames -> eda -> masks -> split -> train@x4 ->
evaluate, then the README's experiment workflow (`dvc exp run -S lr=1e-5`, `dvc exp show`, `dvc metrics diff`,
`dvc plots show`) and per-model param reruns.

The sample runs under the demo profile (params.sample.yaml) plus a tiny training config (one epoch on
32 px frames), so all four models train in seconds: the test is about what DVC runs and records.
"""
from __future__ import annotations

import csv
import json
import re

import pytest
import yaml

from pipeline_utils import TINY_TRAINING, copy_repo, dvc, stages_run
from charseg.config import load_params
from charseg.sample import demo_overrides, generate

pytestmark = pytest.mark.slow

DATA_STAGES = {"frames", "eda", "masks", "identity", "split"}


def _metric_files(models):
    return [f"dvclive/{name}/metrics.json" for name in models] + [f"metrics/evaluate/{name}.json" for name in models]


def _read_metrics(root, models):
    return {rel: json.loads((root / rel).read_text(encoding="utf-8")) for rel in _metric_files(models)}


def _experiment_name(output):
    names = re.findall(r"Ran experiment\(s\): (\S+)", output)
    assert len(names) == 1, output
    return names[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two experiments: the demo profile with tiny training, then the same at lr=1e-5."""
    root = copy_repo(tmp_path_factory.mktemp("pipeline_train") / "repo")
    generate(root / "data" / "raw", seed=0, duration_scale=0.2)
    first = dvc(root, "exp", "run", *demo_overrides(root / "params.sample.yaml"), *TINY_TRAINING)
    models = list(load_params(root / "params.yaml")["models"])
    first_metrics = _read_metrics(root, models)
    # The first `dvc exp run -S` wrote the profile and tiny values into params.yaml: only lr changes now.
    second = dvc(root, "exp", "run", "-S", "lr=1e-5")
    return {"root": root, "models": models, "first": first, "second": second,
            "names": (_experiment_name(first.stdout), _experiment_name(second.stdout)),
            "metrics": (first_metrics, _read_metrics(root, models))}


def _experiments(show):
    """{experiment name: its data} from `dvc exp show --json` (baselines, each with its experiments' revs)."""
    found = {}
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                assert not rev.get("error"), rev["error"]
                found[rev.get("name") or experiment.get("name")] = rev["data"]
    return found


def _flatten(value, prefix=""):
    """Nested metrics as dvc names them: {'truth': {'dice': x}} -> {'truth.dice': x}."""
    if isinstance(value, dict):
        return {k: v for key, inner in value.items() for k, v in _flatten(inner, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def test_first_experiment_runs_every_stage_and_the_lr_change_only_training_and_evaluate(run):
    trains = {f"train@{name}" for name in run["models"]}
    assert len(trains) == 4
    assert stages_run(run["first"].stdout) == DATA_STAGES | trains | {"evaluate"}
    assert stages_run(run["second"].stdout) == trains | {"evaluate"}
    params = load_params(run["root"] / "params.yaml")
    assert params["lr"] == 1e-5 and params["epochs"] == 1 and params["img_size"] == 32
    for name in run["models"]:
        assert (run["root"] / "models" / name / "best.pt").is_file()
    assert "up to date" in dvc(run["root"], "status").stdout


def test_exp_show_holds_every_models_metrics_for_both_experiments(run):
    show = json.loads(dvc(run["root"], "exp", "show", "--json").stdout)
    experiments = _experiments(show)
    for name, lr, recorded in zip(run["names"], (None, 1e-5), run["metrics"]):
        assert name in experiments, f"{name} not in dvc exp show: {sorted(experiments)}"
        data = experiments[name]
        params = data["params"]["params.yaml"]["data"]
        assert params["epochs"] == 1 and (lr is None or params["lr"] == lr)
        metrics = {path: entry["data"] for path, entry in data["metrics"].items()}
        for rel in _metric_files(run["models"]):
            assert metrics[rel] == recorded[rel], rel
        for model in run["models"]:
            assert 0 <= metrics[f"dvclive/{model}/metrics.json"]["best_val_dice"] <= 1
            assert 0 <= metrics[f"metrics/evaluate/{model}.json"]["dice"] <= 1
    first_params, second_params = (experiments[n]["params"]["params.yaml"]["data"] for n in run["names"])
    assert first_params["lr"] != second_params["lr"]


def test_metrics_diff_between_the_experiments_shows_what_changed(run):
    # `dvc exp run` leaves HEAD alone (the copy's commit has no metrics): compare the two experiments.
    first_name, second_name = run["names"]
    diff = json.loads(dvc(run["root"], "metrics", "diff", first_name, second_name, "--json").stdout)
    first, second = run["metrics"]
    for rel in _metric_files(run["models"]):
        old, new = _flatten(first[rel]), _flatten(second[rel])
        changed = {key: {"old": old[key], "new": new[key]} for key in old if old[key] != new[key]}
        shown = {key: {"old": v["old"], "new": v["new"]} for key, v in diff.get(rel, {}).items()}
        assert shown == changed, rel
    for model in run["models"]:  # another learning rate trains other weights: every model's losses move
        assert "val_loss" in diff[f"dvclive/{model}/metrics.json"]
    assert not {"metrics/frames.json", "metrics/masks.json", "metrics/split.json"} & set(diff)


def test_comparison_report_ranks_the_four_models_by_their_evaluate_metrics(run):
    root = run["root"]
    results = {name: json.loads((root / "metrics/evaluate" / f"{name}.json").read_text(encoding="utf-8"))
               for name in run["models"]}
    lines = (root / "reports/comparison.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Rank"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    assert [row["Rank"] for row in rows] == ["1", "2", "3", "4"]
    ranked = [row["Model"] for row in rows]
    assert sorted(ranked) == sorted(run["models"])
    assert ranked == sorted(ranked, key=lambda n: (-results[n]["dice"], n))
    for row in rows:
        result = results[row["Model"]]
        for column, key in (("Dice", "dice"), ("IoU", "iou"), ("Precision", "precision"), ("Recall", "recall"),
                            ("Boundary F1", "boundary_f1")):
            assert row[column] == f"{result[key]:.4f}", (row["Model"], column)
    with open(root / "reports/comparison.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert [r["model"] for r in table] == ranked
    assert all(float(r["dice"]) == pytest.approx(results[r["model"]]["dice"], abs=1e-12) for r in table)


def test_plots_show_renders_every_model_curve_and_the_evaluate_charts(run, tmp_path):
    out = tmp_path / "plots"
    rendered = json.loads(dvc(run["root"], "plots", "show", "--json", "-o", str(out)).stdout)
    assert not rendered.get("errors"), rendered["errors"]
    plots = rendered["data"]
    curves = plots["val_dice_by_model"][0]["content"]["data"]["values"]
    assert {row["filename"].split("/")[0] for row in curves} == set(run["models"])
    second = run["metrics"][1]
    for row in curves:  # one epoch: the curve's only point is the best epoch's Dice
        model = row["filename"].split("/")[0]
        assert float(row["dice"]) == pytest.approx(second[f"dvclive/{model}/metrics.json"]["best_val_dice"])
    for chart in ("metrics.png", "dice_per_character.png", "qualitative.png"):
        (image,) = plots[f"plots/evaluate/{chart}"]
        assert image["type"] == "image" and (out / image["url"].rsplit("/", 1)[-1]).stat().st_size > 0
    for model in run["models"]:
        assert f"dvclive/{model}/plots/metrics/val/dice.tsv" in plots


def test_one_models_param_reruns_only_that_model_and_evaluate(run):
    root = run["root"]

    def train_outs():
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]
        return {name: out["md5"] for name in run["models"] for out in lock[f"train@{name}"]["outs"]
                if out["path"] == f"models/{name}"}

    before = train_outs()
    result = dvc(root, "exp", "run", "-S", "models.pspnet.encoder_lr_mult=0.5")
    assert stages_run(result.stdout) == {"train@pspnet", "evaluate"}
    after = train_outs()
    assert after["pspnet"] != before["pspnet"]
    assert {n: h for n, h in after.items() if n != "pspnet"} == {n: h for n, h in before.items() if n != "pspnet"}
    assert "up to date" in dvc(root, "status").stdout


def test_characters_task_on_the_sample_reruns_training_and_scores_against_exact_per_character_truth(run):
    """`dvc exp run -S task=characters` (issue 14): identity ran with the data stages; only the four models and
    evaluate rerun, and evaluate scores every model against the sample's exact per-character masks too."""
    root = run["root"]
    identity = json.loads((root / "metrics/identity.json").read_text())
    # Weak identity against the exact truth: this 13-frame cut of the sample holds ~10 instances, so one miss is
    # 10%; the full sample's figure (61 instances) is in README.md.
    assert identity["instance_accuracy"] >= 0.6, identity
    result = dvc(root, "exp", "run", "-S", "task=characters")
    assert stages_run(result.stdout) == {f"train@{m}" for m in run["models"]} | {"evaluate"}
    classes = json.loads((root / "data/identity/classes.json").read_text())["classes"]
    assert classes == ["background", "Zoë", "alice", "bob", "other"]
    for model in run["models"]:
        scores = json.loads((root / f"metrics/evaluate/{model}.json").read_text())
        assert 0 <= scores["miou"] <= 1 and 0 <= scores["person_dice"] <= 1
        assert 0 <= scores["truth"]["miou"] <= 1, scores
    assert (root / "plots/evaluate/qualitative.png").is_file()
    assert {f"confusion_{m}.png" for m in run["models"]} <= {p.name for p in (root / "plots/evaluate").iterdir()}
