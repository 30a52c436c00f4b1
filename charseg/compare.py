"""Compare experiments: each model's validation Dice (training) and evaluate's Dice and boundary F1; in the
characters task (params.yaml `task: characters` in the workspace) its validation mIoU, evaluate's mIoU and its
person Dice (all characters merged: the figure a person-task model's Dice lines up with).

    charseg compare            # the workspace, HEAD and HEAD's experiments (as `dvc exp show`)
    charseg compare -A         # every commit; any other `dvc exp show` option passes through

`dvc exp show` lists every param and every metric of every stage, hundreds of columns; this reads its
`--json` and prints the three figures people compare, one row per experiment, then the params each
experiment changed against its baseline commit.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import textwrap
from typing import Any, Iterator

from charseg.errors import CharsegError
from charseg.config import flatten

# (column header, metrics file pattern, key): the figures per model, read from `dvc exp show --json`.
FIGURES = (("val", "dvclive/{model}/metrics.json", "best_val_dice"),
           ("dice", "metrics/evaluate/{model}.json", "dice"),
           ("bF1", "metrics/evaluate/{model}.json", "boundary_f1"))
LEGEND = ("val: best validation Dice during training (dvclive); dice, bF1: evaluate's Dice and boundary F1 "
          "on the same validation frames")
CHARACTER_FIGURES = (("val", "dvclive/{model}/metrics.json", "best_val_miou"),
                     ("mIoU", "metrics/evaluate/{model}.json", "miou"),
                     ("pDice", "metrics/evaluate/{model}.json", "person_dice"))
CHARACTER_LEGEND = ("val: best validation mIoU over the characters during training (dvclive); mIoU: evaluate's; "
                    "pDice: evaluate's person Dice, every character merged (a person-task model's Dice)")


def _params(rev: dict[str, Any]) -> dict[str, Any]:
    data = (rev.get("data") or {}).get("params") or {}
    return dict(flatten((data.get("params.yaml") or {}).get("data") or {}))


def _metric(rev: dict[str, Any], file: str, key: str) -> float | None:
    metrics = (rev.get("data") or {}).get("metrics") or {}
    value = (metrics.get(file) or {}).get("data", {})
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rows(exp_show: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(label, rev, baseline rev or None) for the workspace, each commit and each of its experiments."""
    baseline = next((r for r in exp_show if r.get("rev") != "workspace"), None)
    for rev in exp_show:
        if rev.get("rev") == "workspace":
            yield "workspace", rev, baseline
            continue
        yield f"{rev.get('name') or rev['rev'][:7]} ({rev['rev'][:7]})", rev, None
        for experiment in rev.get("experiments") or []:
            for exp_rev in experiment.get("revs") or []:
                yield f"└ {exp_rev.get('name') or experiment.get('name')} ({exp_rev['rev'][:7]})", exp_rev, rev


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(exp_show: list[dict[str, Any]]) -> str:
    table = list(rows(exp_show))
    characters = bool(table) and _params(table[0][1]).get("task") == "characters"  # the workspace's task
    figures, legend = (CHARACTER_FIGURES, CHARACTER_LEGEND) if characters else (FIGURES, LEGEND)
    models: list[str] = []
    for _, rev, _ in table:
        for key in _params(rev):
            if key.startswith("models.") and key.split(".")[1] not in models:
                models.append(key.split(".")[1])
    if not models:
        raise CharsegError("dvc exp show found no models: in params.yaml")
    label_width = max(len("experiment"), *(len(label) for label, _, _ in table))
    cell = len(_fmt(0.0))
    group = " ".join(f"{h:<{cell}}" for h, _, _ in figures)
    width = max(len(group), *(len(m) for m in models))
    lines = [" " * label_width + "  " + "  ".join(f"{m:<{width}}" for m in models),
             f"{'experiment':<{label_width}}  " + "  ".join(group for _ in models)]
    changes: list[str] = []
    line_width = max(80, shutil.get_terminal_size().columns)
    for label, rev, base in table:
        if rev.get("error"):
            lines.append(f"{label:<{label_width}}  (failed or unreadable: {rev['error'].get('msg', rev['error'])})")
            continue
        cells = ["  ".join(" ".join(f"{_fmt(_metric(rev, f.format(model=m), k)):<{cell}}" for _, f, k in figures)
                           .ljust(width) for m in models)]
        lines.append(f"{label:<{label_width}}  " + cells[0])
        if base is not None:
            mine, theirs = _params(rev), _params(base)
            changed = [f"{k}={json.dumps(mine.get(k))}" for k in mine.keys() | theirs.keys()
                       if mine.get(k) != theirs.get(k)]
            if changed:
                changes.append(textwrap.fill(f"{label.lstrip('└ ')}: {', '.join(sorted(changed))}", line_width,
                                             initial_indent="  ", subsequent_indent="      "))
    if changes:
        lines += ["", "params changed against the baseline commit:", *changes]
    return "\n".join(lines + ["", legend])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _, passthrough = parser.parse_known_args(argv)
    if shutil.which("dvc") is None:
        raise CharsegError("dvc is not on PATH: activate the project's environment (source .venv/bin/activate)")
    proc = subprocess.run(["dvc", "exp", "show", "--json", *passthrough], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CharsegError(f"dvc exp show failed: {(proc.stderr or proc.stdout).strip()}")
    try:
        exp_show = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise CharsegError(f"dvc exp show --json printed no JSON ({err}): {proc.stdout[:200]}") from None
    print(render(exp_show))

