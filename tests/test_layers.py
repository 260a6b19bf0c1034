"""The layers of ARCHITECTURE.md, enforced: imports point down, and no stage imports another stage.

    pipeline    align.stages.*, runner, report, evaluation, rollouts CLI, demo, cli
    components  reward/, labeling_app/         (only public names of core)
    core        align: errors, artifacts, data, models, config, training, losses, sequences, ...

Every import in every module is read with `ast`, the ones inside functions included (most heavy
imports here are lazy). A module missing from the table below fails the test, so a new file has
to pick its layer.
"""

import ast
from pathlib import Path

from align.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "reward", "labeling_app")

CORE = {"align", "align.__init__", "align.errors", "align.artifacts", "align.data", "align.models", "align.config",
        "align.training", "align.losses", "align.sequences", "align.rollouts", "align.rollouts.hf",
        "align.rollouts.vllm", "align.rollouts.vllm_internals", "align.generate", "align.chat_template", "align.tiny",
        "align.console",
        "align.distributed", "align.judges", "align.forgetting", "align.hacking", "align.prefix_sharing"}
PIPELINE = {"align.__main__", "align.cli", "align.runner", "align.report", "align.evaluate", "align.policy_eval",
            "align.demo", "align.rollouts.cli", "align.stages", "align.launch", "align.data_check"}
RANK = {"core": 0, "components": 1, "pipeline": 2}


def layer(module: str) -> str | None:
    if module in CORE:
        return "core"
    if module in PIPELINE or module.startswith("align.stages."):
        return "pipeline"
    if module.split(".")[0] in ("reward", "labeling_app"):
        return "components"
    return None


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import of one of our packages."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return [f for f in found if f[1].split(".")[0] in PACKAGES]


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) is None] == []


def test_imports_point_down_and_components_use_public_names_of_core():
    problems = []
    for module, path in modules().items():
        mine = layer(module)
        for line, target, names in imports(path):
            theirs = layer(target)
            if theirs is None:  # `from align import x`: the submodule is the real target
                theirs = min((layer(f"{target}.{n}") or "pipeline" for n in names), key=RANK.get, default="core")
            where = f"{path.relative_to(REPO)}:{line}: {module} ({mine}) imports {target} ({theirs})"
            if RANK[theirs] > RANK[mine]:
                problems.append(where + ": upward")
            if mine == "components" and theirs == "core" and any(n.startswith("_") for n in names):
                problems.append(where + f": private name {[n for n in names if n.startswith('_')]}")
            if mine == "components" and theirs == "components" and target.split(".")[0] != module.split(".")[0]:
                problems.append(where + ": one component imports another")
    assert problems == []


def test_no_stage_imports_another_stage():
    stage_modules = {spec.runner.partition(":")[0] for spec in STAGES.values()}
    problems = []
    for module in stage_modules:
        for line, target, names in imports(modules()[module]):
            others = {target} | {f"{target}.{n}" for n in names}
            hit = (others & stage_modules) - {module}
            if hit:
                problems.append(f"{module}:{line} imports {sorted(hit)}")
    assert problems == []


def test_the_check_itself_catches_an_upward_import(tmp_path):
    """The walk must see a lazy import inside a function, and rank it."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from align.stages.dpo import run\n    import reward.score\n")
    found = imports(path)
    assert [(t, layer(t)) for _, t, _ in found] == [("align.stages.dpo", "pipeline"), ("reward.score", "components")]


def test_no_function_over_80_lines():
    """A function a reader cannot hold in view is a phase that wants its own name (and test)."""
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{path.relative_to(REPO)}:{start} {node.name} ({node.end_lineno - start + 1} lines)")
    assert long == []
