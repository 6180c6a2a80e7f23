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
    "numba",  # the compiled CPU row step (hsl_engine/_compiled.py), imported at first use
    "llvmlite",  # the explicit-SIMD lifted pass (hsl_engine/_simd.py), imported at first use
    "torch",  # optional (the gpu extra): imported inside functions only, see below
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


def test_engine_works_without_torch():
    """PyTorch is optional: with it unimportable the engine imports, runs NumPy specs, and
    refuses the torch backend with a clear DeviceError."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        # an installation without torch: every import of it fails as a missing module does
        # (a None in sys.modules would also break SciPy's own probe for torch arrays)
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import hsl_engine as he\n"
        "spec = he.parse_spec({'model': {'d': 8}, 'sweep': {'alphas': [2.0], 'seeds': 1}})\n"
        "[p] = he.iter_run(spec, 'layerwise_spectral', 0)\n"
        "assert p.extra['backend'] == 'numpy' and he.resolve_device('auto') == 'cpu'\n"
        "try:\n"
        "    he.get_backend('cpu', backend='torch')\n"
        "except he.DeviceError as exc:\n"
        "    print('refused:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: backend 'torch' needs PyTorch" in out.stdout


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


ROOT = Path(hsl_engine.__file__).parent.parent


def _package_imports(package: str) -> dict[str, set[str]]:
    """Module path -> absolute names it imports (relative imports resolved)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            pkg_parts = parts
        else:
            pkg_parts = parts[:-1]
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_parts[: len(pkg_parts) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                    names.add(mod)
                    names.update(f"{mod}.{a.name}" for a in node.names)
                elif node.module:
                    names.add(node.module)
        out[str(rel)] = names
    return out


def _tops(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_service_never_imports_the_worker():
    imports = _package_imports("service")
    assert len(imports) > 8
    for module, names in imports.items():
        assert "worker" not in _tops(names), f"{module} imports the worker"
        assert not any(n == "hsl.cli" or n.startswith("hsl.server") for n in names), module


def test_db_and_config_are_fastapi_free():
    imports = _package_imports("service")
    checked = [m for m in imports if m.startswith("service/db") or m == "service/config"]
    assert len(checked) >= 5
    for module in checked:
        assert not _tops(imports[module]) & {"fastapi", "starlette"}, module


def test_worker_uses_only_the_db_and_config_of_the_service():
    for module, names in _package_imports("worker").items():
        assert not _tops(names) & {"fastapi", "starlette", "uvicorn"}, module
        for name in names:
            if name.split(".")[0] == "service":
                assert name.startswith(("service.db", "service.config")), f"{module}: {name}"


def test_revisions_import_only_sqlalchemy_and_alembic():
    for module, names in _package_imports("migrations/versions").items():
        assert _tops(names) <= {"sqlalchemy", "alembic", "__future__"}, module
