"""The engine's import graph: no cycles, no module importing a layer above its own, and no Streamlit
in analysis/ (README, "Architecture"). Read from the source with ast, so it checks deferred imports too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import only from its own layer's lower neighbours (strictly lower layers)
LAYERS = [
    {"errors"},
    {"runtime", "layers", "powerlaw", "pruners", "allocation", "jobs", "export", "checkpoint"},
    {"data", "store", "calibration", "evaluation", "loading"},
    {"owl", "pruning", "settings", "spectra", "zeroshot"},
    {"search"},
    {"pipeline"},
    {"sweep"},
    {"session", "cli"},
    {"__main__"},
]


def project_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in ("analysis", "components", "pages", "streamlit")}
    return out


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if module in layer:
            return i
    raise AssertionError(f"analysis/{module}.py is in no layer of tests/test_architecture.py (and the README)")


def test_engine_layers_only_import_downwards():
    for path in sorted((ROOT / "analysis").glob("*.py")):
        if path.stem == "__init__":
            continue
        mine = layer_of(path.stem)
        for dep in project_imports(path):
            assert not dep.startswith(("components", "pages", "streamlit")), f"{path.name} imports {dep}"
            other = dep.split(".")[1] if "." in dep else None
            assert other is not None, f"{path.name}: import the module, not the package: {dep}"
            assert layer_of(other) < mine, f"{path.name} (layer {mine}) imports {other} (layer {layer_of(other)})"


def test_components_do_not_import_pages():
    for path in sorted((ROOT / "components").rglob("*.py")):
        assert not any(d.startswith("pages") for d in project_imports(path)), path


def test_every_error_class_of_the_engine_is_an_alphascope_error():
    """A script catches every user-facing error with `except AlphascopeError` (README, "Architecture")."""
    import importlib

    from analysis.errors import AlphascopeError

    found = []
    for path in sorted((ROOT / "analysis").glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        module = importlib.import_module(f"analysis.{path.stem}")
        found += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Exception)
                  and c.__module__ == module.__name__ and c.__name__.endswith("Error")]  # not control flow
    assert len(found) >= 12 and all(issubclass(c, AlphascopeError) for c in found), found
