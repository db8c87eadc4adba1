"""The layout: each backbone in one home (localgp/backbones/<home>/), named in one table
(localgp.train_config.BACKBONES), and the shared method importing none of them."""

import ast
from pathlib import Path

import pytest

import localgp
from localgp.backbones import backbone_class
from localgp.bench import PARTS
from localgp.errors import UserError
from localgp.train_config import BACKBONES, TRAINED, TrainConfig

PACKAGE = Path(localgp.__file__).parent
# The method every backbone shares: it may not import a backbone's module, not even in a function.
SHARED = ["gates.py", "ops.py", "reference.py", "flops.py", "model", "decoding", "bench/core.py"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_shared_method_imports_no_backbone():
    files = [f for entry in SHARED for f in ([PACKAGE / entry] if entry.endswith(".py") else
                                             sorted((PACKAGE / entry).rglob("*.py")))]
    assert len(files) > 10
    homes = {f"localgp.backbones.{b.home}" for b in BACKBONES.values()}
    found = {str(f.relative_to(PACKAGE)): sorted({h for n in imported_modules(f) for h in homes
                                                  if n == h or n.startswith(h + ".")})
             for f in files}
    allowed = {"flops.py": ["localgp.backbones.owsm"],  # OWSM's presets' shapes, as flops counts them
               "bench/core.py": ["localgp.backbones.owsm"]}  # --preset checked before anything is built
    assert {f: n for f, n in found.items() if n} == allowed


@pytest.mark.parametrize("name", list(BACKBONES))
def test_each_backbone_has_one_home(name):
    home = PACKAGE / "backbones" / BACKBONES[name].home
    assert (home / "__init__.py").is_file()
    assert bool(list(home.glob("bench*.py"))) == bool(BACKBONES[name].bench_parts)
    assert set(PARTS[name]()) == set(BACKBONES[name].bench_parts)  # the parts the table names, built there
    if name in TRAINED:
        cls = backbone_class(name)
        assert cls.name == name and cls.__module__ == f"localgp.backbones.{BACKBONES[name].home}.backbone"
    else:
        with pytest.raises(UserError, match="backbone must be one of"):
            backbone_class(name)
        with pytest.raises(UserError, match="localgp train does not train it"):
            TrainConfig(out_dir="out", backbone=name)


def test_the_commands_take_the_table():
    from localgp.cli import build_parser

    parser = build_parser()
    choices = {}
    for action in parser._subparsers._group_actions[0].choices.items():
        command, sub = action
        for a in sub._actions:
            if a.dest == "backbone" and a.choices is not None:
                choices[command] = list(a.choices)
    assert choices["bench"] == choices["profile"] == [n for n, b in BACKBONES.items() if b.bench_parts]
    assert choices["demo"] == list(TRAINED)
