"""The package's layers only point down (docs/architecture.md), and a config error costs no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "semiseg"

# Lowest first; a module may import its own floor or any floor below.
FLOORS = [
    ("semiseg.errors", "semiseg.viz"),
    ("semiseg.config",),
    ("semiseg.models",),
    ("semiseg.data",),
    ("semiseg.methods",),
    ("semiseg.engine",),
    ("semiseg.api", "semiseg.bench", "semiseg.demo", "semiseg.export", "semiseg.pseudo_label", "semiseg.report",
     "semiseg.self_training", "semiseg.sweep"),
    ("semiseg.cli", "semiseg.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    for i, names in enumerate(FLOORS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is on no floor of FLOORS: add it")


def imports(path: Path) -> set[str]:
    """Every semiseg module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")
            if p != PACKAGE / "__init__.py"}  # the package face imports semiseg.api on first use


def test_no_module_imports_a_floor_above_its_own():
    upward = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
              if t != "semiseg" and floor(t) > floor(m)]
    assert upward == []


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


CHECK = """
import sys
from semiseg.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print(code, sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules))
"""


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0),
    (["train", "synthetic", "--set", "train.iter=3"], 2),  # a typo in a key
    (["check-data", "synthetic", "--set", "data.crop_size=abc"], 2),
    (["train", "no_such_config"], 2),
    (["bench", "synthetic", "--set", "method.name=unimach"], 2),
    (["report", "no_such_run_dir"], 1),  # a mistyped run directory
])
def test_help_and_config_errors_load_no_torch(argv, code):
    out = subprocess.run([sys.executable, "-c", CHECK.format(argv=argv)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == f"{code} []", out.stderr
