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


# the CLI package's own modules, lowest first: the shared options, the checks, the commands, then main
CLI_LAYERS = [{"options"}, {"checks"}, {"allocate", "prune", "sweep", "spectra"}, {"__init__"}]


def engine_modules() -> list[tuple[Path, str]]:
    """(path, layer name) of every engine module; the cli package's modules are all in the cli layer."""
    found = [(p, p.stem) for p in sorted((ROOT / "analysis").glob("*.py")) if p.stem != "__init__"]
    return found + [(p, "cli") for p in sorted((ROOT / "analysis" / "cli").glob("*.py"))]


def test_engine_layers_only_import_downwards():
    for path, name in engine_modules():
        mine = layer_of(name)
        for dep in project_imports(path):
            assert not dep.startswith(("components", "pages", "streamlit")), f"{path.name} imports {dep}"
            other = dep.split(".")[1] if "." in dep else None
            assert other is not None, f"{path.name}: import the module, not the package: {dep}"
            if other == "cli" and name == "cli":  # within the package: downwards in CLI_LAYERS
                low, high = (next(i for i, layer in enumerate(CLI_LAYERS) if m in layer)
                             for m in (dep.split(".")[2], path.stem))
                assert low < high, f"cli/{path.name} imports {dep}"
                continue
            assert layer_of(other) < mine, f"{path.name} (layer {mine}) imports {other} (layer {layer_of(other)})"


def test_the_cli_package_has_every_module_in_a_layer():
    assert {p.stem for p in (ROOT / "analysis" / "cli").glob("*.py")} == set().union(*CLI_LAYERS)


def test_components_do_not_import_pages():
    for path in sorted((ROOT / "components").rglob("*.py")):
        assert not any(d.startswith("pages") for d in project_imports(path)), path


def test_every_error_class_of_the_engine_is_an_alphascope_error():
    """A script catches every user-facing error with `except AlphascopeError` (README, "Architecture")."""
    import importlib

    from analysis.errors import AlphascopeError

    found = []
    for path, name in engine_modules():
        if path.stem == "__main__":
            continue
        module = importlib.import_module(f"analysis.{path.stem}" if name != "cli" else
                                         "analysis.cli" + ("" if path.stem == "__init__" else f".{path.stem}"))
        found += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, Exception)
                  and c.__module__ == module.__name__ and c.__name__.endswith("Error")]  # not control flow
    assert len(found) >= 12 and all(issubclass(c, AlphascopeError) for c in found), found


def test_engine_defaults_are_the_settings_defaults():
    """A script calling the engine's functions without an argument gets what the CLI and the dashboard do: each
    default below is the settings' (analysis.settings), whichever module declares it (README, "Architecture")."""
    import inspect

    from analysis import allocation, data, loading, owl, pipeline, pruning, search, spectra
    from analysis.settings import (
        AllocationSettings,
        CalibrationSettings,
        EvaluationSettings,
        PruneSettings,
        SpectraSettings,
    )

    A, C, E, P, S = AllocationSettings, CalibrationSettings, EvaluationSettings, PruneSettings, SpectraSettings
    same = {  # (function, parameter): the settings' field
        (allocation.allocate, "epsilon"): A.epsilon, (allocation.allocate, "metric"): A.metric,
        (allocation.allocate, "granularity"): A.granularity, (allocation.allocate, "owl_lambda"): A.owl_lambda,
        (allocation.allocate, "method"): A.method,
        (owl.collect_outlier_ratios, "owl_threshold"): A.owl_threshold,
        (data.calibration_batches, "n_samples"): C.n_samples, (data.calibration_batches, "seqlen"): C.seqlen,
        (data.calibration_batches, "seed"): C.seed, (data.eval_windows, "seqlen"): E.seqlen,
        (data.eval_windows, "max_windows"): E.max_windows, (loading.estimate_memory, "n_samples"): C.n_samples,
        (loading.estimate_memory, "seqlen"): C.seqlen, (pruning.prune, "method"): P.method,
        (pipeline.build_allocation, "prune_method"): P.method, (spectra.analyze, "fit"): S.fit,
        (spectra.analyze, "farms"): S.farms, (spectra.analyze, "normalize"): S.normalize,
        (spectra.analyze, "include_outside"): S.include_outside, (spectra.analyze_checkpoint, "fit"): S.fit,
        (search.search_allocation, "prune_method"): P.method, (search.search_allocation, "steps"): A.search_steps,
        (search.search_allocation, "seed"): A.search_seed, (search.search_allocation, "step"): A.search_step,
        (search.search_allocation, "space"): A.search_space,
        (search.search_allocation, "objective"): A.search_objective,
        (search.search_allocation, "verify"): A.search_verify,
    }
    differ = [f"{fn.__module__}.{fn.__name__}({name}={inspect.signature(fn).parameters[name].default!r}), "
              f"settings {want!r}" for (fn, name), want in same.items()
              if inspect.signature(fn).parameters[name].default != want]
    assert not differ, differ
