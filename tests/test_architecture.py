"""Dependencies point one way: the engine imports no web, queue, database or adapter code."""

import ast
from pathlib import Path

import hsl_engine

FORBIDDEN = {
    "fastapi",
    "starlette",
    "celery",
    "kombu",
    "redis",
    "sqlalchemy",
    "alembic",
    "service",
    "worker",
    "hsl",
    "matplotlib",
    "os.environ",
}
ALLOWED_THIRD_PARTY = {
    "hsl_engine",
    "numpy",
    "scipy",
    "pydantic",
    "pydantic_core",
    "array_api_compat",
    "threadpoolctl",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_engine_imports_only_numerics():
    root = Path(hsl_engine.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) > 5
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top not in ALLOWED_THIRD_PARTY:
                # standard library only
                assert top in __import__("sys").stdlib_module_names, f"{path.name}: {name}"


def test_engine_reads_no_environment_and_prints_nothing():
    root = Path(hsl_engine.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, path.name
        tree = ast.parse(text)
        calls = [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        ]
        assert not calls, f"{path.name} prints"
