"""The packages' imports run one way: parallel primitives -> models -> layout -> train (-> cli),
counting imports inside functions too. A module may import its own layer and the ones below.
(config is not in the order yet: it looks presets and registry keys up in models.)"""
import ast
import pathlib

ORDER = ["parallel", "models", "layout", "train"]
ROOT = pathlib.Path(__file__).resolve().parent.parent / "forge"


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "forge" and parts[1] in ORDER else None


def test_imports_form_a_dag():
    upward = []
    for path in ROOT.rglob("*.py"):
        me = _layer("forge." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        if me is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                them = _layer(name)
                if them is not None and ORDER.index(them) > ORDER.index(me):
                    upward.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} ({me}) imports {name} ({them})")
    assert not upward, "\n".join(upward)


def test_layers_exist():
    assert all((ROOT / layer).is_dir() for layer in ORDER)
