"""The package's architecture, checked: import layering, no cycles, configs that need neither torch nor DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, dist_env

PACKAGE = ROOT / "mpomoe_ds"

# Lower layers never import higher ones. Same-layer imports are allowed (inside a subpackage).
LAYERS = {"config": 0, "parallel": 1, "mpo": 2, "data": 2, "moe": 3, "omoe": 4, "models": 5, "training": 6, "cli": 7}

# Modules whose import must stay light: a bad config fails in a fraction of a second.
CONFIG_MODULES = ["mpomoe_ds.config", "mpomoe_ds.mpo.config", "mpomoe_ds.moe.config", "mpomoe_ds.omoe.config",
                  "mpomoe_ds.models.config", "mpomoe_ds.data.config", "mpomoe_ds.training.config",
                  "mpomoe_ds.training.run_config"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every mpomoe_ds module ``path`` imports, at any depth (function-level imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mpomoe_ds"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("mpomoe_ds"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names
                             if (ROOT / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
    return found


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "mpomoe_ds"


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_module_sits_in_a_known_layer_and_has_a_docstring():
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name == "mpomoe_ds":
            continue
        assert layer_of(name) in LAYERS, f"{name}: add its subpackage to LAYERS (and to the README's module table)"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no top docstring saying what it owns"


def test_no_module_imports_a_higher_layer():
    upward = [f"{a} -> {b}" for a, deps in import_graph().items() for b in deps
              if layer_of(b) in LAYERS and layer_of(a) in LAYERS and LAYERS[layer_of(b)] > LAYERS[layer_of(a)]]
    assert not upward, f"upward imports ({' < '.join(LAYERS)}): {upward}"


def test_import_graph_has_no_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + "."):  # a package importing its own modules is not a cycle
                continue
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(dep):] + [dep])}")
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_graph_checker_sees_relative_function_level_and_upward_imports(tmp_path, monkeypatch):
    """The checker itself: it must notice the kinds of imports it polices."""
    fake = tmp_path / "mpomoe_ds" / "moe"
    fake.mkdir(parents=True)
    (tmp_path / "mpomoe_ds" / "training").mkdir()
    (tmp_path / "mpomoe_ds" / "training" / "trainer.py").write_text('"""x"""\n')
    (fake / "layer.py").write_text('"""x"""\ndef f():\n    from ..training import trainer\n    import mpomoe_ds.cli\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = imported_modules(fake / "layer.py")
    assert {"mpomoe_ds.training", "mpomoe_ds.training.trainer", "mpomoe_ds.cli"} <= found


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_config_modules_import_neither_torch_nor_deepspeed(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=dist_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} pulled in {out.stdout.strip()}"


def test_dataclass_defaults_are_the_run_defaults():
    """One source of defaults: the Python API and the CLI start from the same values."""
    from mpomoe_ds.config import to_dict
    from mpomoe_ds.data.config import DataConfig
    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.training.config import OptimConfig
    from mpomoe_ds.training.run_config import RunConfig, load_run_config

    loaded = to_dict(load_run_config())
    assert loaded == to_dict(RunConfig())
    assert loaded["moe"] == to_dict(MoEConfig()) and loaded["data"] == to_dict(DataConfig())
    assert loaded["optim"] == to_dict(OptimConfig())
    assert (loaded["moe"]["ep_size"], loaded["moe"]["layers"], loaded["moe"]["expert_init"]) == (0, "every_other",
                                                                                               "perturb")
    assert MoEConfig().with_ep_size(1).ep_size == 1 and MoEConfig(num_experts=8).with_ep_size(4).ep_size == 4
    assert MoEConfig(num_experts=4).with_ep_size(6).ep_size == 2  # largest divisor of both


# Collectives live in mpomoe_ds/parallel.py only (it places tensors on the backend's device).
# Names no tensor or module API shares are flagged on any receiver but `parallel`; names that
# tensors also have (x.gather, x.scatter_) only on a torch.distributed / deepspeed.comm alias.
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_object",
               "all_gather_coalesced", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "gather_object",
               "scatter_object_list", "barrier", "monitored_barrier", "isend", "irecv", "inference_all_reduce",
               "_AllToAll"}
AMBIGUOUS_COLLECTIVES = {"reduce", "gather", "scatter", "send", "recv"}
DIST_MODULES = ("torch.distributed", "deepspeed.comm")
COLLECTIVES_MODULE = PACKAGE / "parallel.py"


def collective_calls(path: Path) -> list[str]:
    """``line: name`` of every collective ``path`` reaches for outside :mod:`mpomoe_ds.parallel`."""
    tree = ast.parse(path.read_text())
    aliases = {"dist", "comm"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name.startswith(DIST_MODULES))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("torch", "deepspeed"):
            aliases.update(a.asname or a.name for a in node.names
                           if f"{node.module}.{a.name}".startswith(DIST_MODULES))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("mpomoe_ds") and node.level == 0:
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name in COLLECTIVES
                      or (a.name in AMBIGUOUS_COLLECTIVES and node.module.startswith(DIST_MODULES))]
        elif isinstance(node, ast.Attribute):
            receiver = ast.unparse(node.value)
            if node.attr in COLLECTIVES and receiver != "parallel":
                found.append(f"{node.lineno}: {receiver}.{node.attr}")
            elif node.attr in AMBIGUOUS_COLLECTIVES and (receiver in aliases or receiver.startswith(DIST_MODULES)):
                found.append(f"{node.lineno}: {receiver}.{node.attr}")
    return found


def test_only_the_parallel_module_calls_collectives():
    offenders = {module_name(p): calls for p in PACKAGE.rglob("*.py") if p != COLLECTIVES_MODULE
                 for calls in [collective_calls(p)] if calls}
    assert not offenders, f"route these through mpomoe_ds.parallel (it places tensors for the backend): {offenders}"


def test_collective_checker_sees_every_spelling(tmp_path):
    """The checker itself: aliases, full paths, from-imports, DeepSpeed's comm and all-to-all; not tensor ops."""
    sample = tmp_path / "sample.py"
    sample.write_text('"""x"""\nimport torch\nimport torch.distributed as td\nfrom deepspeed import comm as c\n'
                      'from torch.distributed import all_gather_object\nfrom deepspeed.moe.sharded_moe import _AllToAll\n'
                      'td.all_reduce(x)\ntorch.distributed.barrier()\nc.broadcast(x, 0)\ntd.gather(x)\n'
                      'x.gather(0, i)\nparallel.all_reduce(x)\n')
    assert collective_calls(sample) == ["5: import all_gather_object", "6: import _AllToAll", "7: td.all_reduce",
                                        "8: torch.distributed.barrier", "9: c.broadcast", "10: td.gather"]
