"""dvc.yaml is in step with the code and the params: every stage depends on exactly the code files its
entry point imports (directly or not), so that editing shared code reruns exactly the stages that use it;
the top-level plots and artifacts name exactly the models of params.yaml."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("stages", "charseg")


def local_imports(module_file: Path) -> set[Path]:
    """The project files (stages/, charseg/) that `module_file` imports, transitively, including itself.
    Package __init__.py files are left out: they hold docstrings only."""
    seen: set[Path] = set()
    todo = [module_file]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = path.relative_to(REPO_ROOT).parent.parts
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[tuple[str, ...]] = []
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else ()
                module = tuple(node.module.split(".")) if node.module else ()
                names = [base + module + (alias.name,) for alias in node.names] + [base + module]
            elif isinstance(node, ast.Import):
                names = [tuple(alias.name.split(".")) for alias in node.names]
            for parts in names:
                if parts and parts[0] in CODE_PACKAGES:
                    candidate = REPO_ROOT.joinpath(*parts).with_suffix(".py")
                    if candidate.is_file() and candidate.name != "__init__.py":
                        todo.append(candidate)
    return seen


def test_package_init_files_hold_no_code():
    """What local_imports leaves out must not matter to a stage's result."""
    for init in REPO_ROOT.glob("*/**/__init__.py"):
        if init.parts[len(REPO_ROOT.parts)] not in CODE_PACKAGES:
            continue
        body = ast.parse(init.read_text(encoding="utf-8")).body
        code = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        assert not code, f"{init.relative_to(REPO_ROOT)} holds code: dvc.yaml's deps would not see it"


def test_every_stage_depends_on_the_code_it_imports():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
        code = local_imports(REPO_ROOT / (module.replace(".", "/") + ".py"))
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        expected = sorted(str(p.relative_to(REPO_ROOT)) for p in code)
        missing = sorted(set(expected) - deps)
        assert not missing, f"dvc.yaml stage {name!r} imports but does not depend on {missing} (code deps: {expected})"
        unused = sorted(d for d in deps if d.startswith(tuple(f"{p}/" for p in CODE_PACKAGES))
                        and REPO_ROOT / d not in code)
        assert not unused, f"dvc.yaml stage {name!r} depends on code it never imports: {unused}"
        checked += 1
    assert checked >= 6


def test_top_level_plots_and_artifacts_name_exactly_the_models_of_params_yaml():
    """train is `foreach: ${models}`, but the combined curve and the model registry are listed by hand:
    a model added to (or removed from) params.yaml must be added there too."""
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    models = list(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["models"])
    curves = next(plot["val_dice_by_model"] for plot in dvc_yaml["plots"] if "val_dice_by_model" in plot)
    assert list(curves["y"]) == [f"dvclive/{name}/plots/metrics/val/dice.tsv" for name in models]
    assert list(dvc_yaml["artifacts"]) == models
    for name, artifact in dvc_yaml["artifacts"].items():
        assert artifact["path"] == f"models/{name}/best.pt" and artifact["type"] == "model"
