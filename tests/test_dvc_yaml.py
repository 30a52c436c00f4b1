"""dvc.yaml declares, for every stage, exactly the code files the stage's module imports (directly or not),
so that editing shared code reruns exactly the stages that use it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def local_imports(module_file: Path) -> set[Path]:
    """The files under stages/ that `module_file` imports, transitively, including itself."""
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
                if parts and parts[0] == "stages":
                    candidate = REPO_ROOT.joinpath(*parts).with_suffix(".py")
                    if candidate.is_file() and candidate.name != "__init__.py":
                        todo.append(candidate)
    return seen


def test_every_stage_depends_on_the_code_it_imports():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = re.search(r"python -m (stages\.\w+)", stage["cmd"]).group(1)
        code = local_imports(REPO_ROOT / (module.replace(".", "/") + ".py"))
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        missing = sorted(str(p.relative_to(REPO_ROOT)) for p in code
                         if str(p.relative_to(REPO_ROOT)) not in deps)
        assert not missing, f"dvc.yaml stage {name!r} imports but does not depend on {missing}"
        unused = sorted(d for d in deps if d.startswith("stages/") and REPO_ROOT / d not in code)
        assert not unused, f"dvc.yaml stage {name!r} depends on code it never imports: {unused}"
        checked += 1
    assert checked >= 6
