"""How the package hangs together: the public names, no import cycles, the library
apart from the application, methods apart from the trainer, one method registry."""
import ast
import os
import subprocess
import sys

import pytest

import mlellp_ext

ROOT = os.path.dirname(os.path.abspath(mlellp_ext.__file__))


def test_public_names():
    from mlellp_ext import BagBatchSampler, EMTargets, dllp_loss  # noqa: F401
    for name in mlellp_ext.__all__:
        assert hasattr(mlellp_ext, name), name


def _modules():
    """{module name: path} of every module of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(folder, f)
    return out


def _imports(name, path, modules):
    """The package modules that `name` imports anywhere in its code (functions included)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x` may name a module
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
            if target in modules:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    found.discard(name)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_import_cycle():
    graph = _graph()
    assert "mlellp_ext.app.methods.em" in graph and "mlellp_ext.em" in graph  # the walk found the modules
    cycles = [m for m in graph if m in _reach(graph, m)]
    assert not cycles, {m: sorted(graph[m]) for m in cycles}


def test_library_never_imports_the_application():
    graph = _graph()
    in_app = lambda m: m == "mlellp_ext.app" or m.startswith("mlellp_ext.app.")  # noqa: E731 (not .approx)
    for name in graph:  # (__main__ is the command's entry point: `python -m mlellp_ext`)
        if not in_app(name) and name != "mlellp_ext.__main__":
            assert not any(in_app(m) for m in _reach(graph, name)), name


def test_methods_do_not_import_the_trainer():
    graph = _graph()
    methods = [m for m in graph if m.startswith("mlellp_ext.app.methods")]
    assert len(methods) >= 5
    for name in methods:
        reach = _reach(graph, name)
        assert "mlellp_ext.app.train" not in reach and "mlellp_ext.app.cli" not in reach, name


def test_every_module_imports_alone():
    # A cycle that reading imports misses (e.g. through a package's __init__) fails here:
    # each module is the first one imported, in one fresh interpreter per run of the loop.
    code = ("import importlib, subprocess, sys\n"
            "for m in sys.argv[1:]:\n"
            "    subprocess.run([sys.executable, '-c', f'import importlib; importlib.import_module({m!r})'],"
            " check=True)\n")
    modules = [m for m in _modules() if m != "mlellp_ext.__main__"]
    subprocess.run([sys.executable, "-c", code, *modules], check=True, timeout=600)


def test_cli_method_choices_come_from_the_registry():
    from mlellp_ext.app import cli
    from mlellp_ext.app.methods import METHODS, Method, register_method

    class Nothing(Method):
        def __init__(self, offsets):
            self.offsets = offsets

    assert "made-up" not in METHODS
    register_method("made-up", Nothing, "a test's method")
    try:
        args = cli.build_parser().parse_args(["train", "--method", "made-up", "--out", "x"])
        assert args.method == "made-up"
    finally:
        del METHODS["made-up"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--method", "made-up", "--out", "x"])


def test_only_methods_that_say_so_get_labels():
    import torch

    from mlellp_ext.app.methods import METHODS, Method, build_method, register_method

    class Peek(Method):
        def __init__(self, offsets, labels):
            self.labels = labels

    offered = dict(offsets=torch.tensor([0, 1]), counts=torch.tensor([1]), labels=torch.tensor([1]))
    register_method("peek", Peek, "wants labels without saying so")
    register_method("peek-labelled", Peek, "says so", needs_labels=True)
    try:
        with pytest.raises(TypeError, match="method .peek.: Peek needs labels"):
            build_method("peek", **offered)
        assert torch.equal(build_method("peek-labelled", **offered).labels, offered["labels"])
    finally:
        del METHODS["peek"], METHODS["peek-labelled"]
    builtin = ("mle", "mle-direct", "dllp", "supervised", "llpgan")
    assert [n for n in builtin if METHODS[n].needs_labels] == ["supervised"]
    with pytest.raises(ValueError, match="a method named 'mle' is registered already"):
        register_method("mle", Peek, "x")


def test_gradient_step_needs_the_networks():
    import torch

    from mlellp_ext.app.distributed import SINGLE
    from mlellp_ext.app.methods import gradient_step

    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="gradient_step: name the networks"):
        gradient_step(net(torch.ones(1, 2)).sum(), opt, SINGLE)
    before = net.weight.detach().clone()
    gradient_step(net(torch.ones(1, 2)).sum(), opt, SINGLE, net)
    assert not torch.equal(before, net.weight)
