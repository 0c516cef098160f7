"""The public surface: what `import dispatcher` promises, and what the package keeps private."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import pickle
import pkgutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import dispatcher
from dispatcher import Balancer, SegmentError, _lock, errors
from tests.helpers import Echo, as_another_process

PACKAGE = Path(dispatcher.__file__).parent


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def top_level_definitions(path: Path) -> set[str]:
    """Names a module defines itself at top level: functions, classes, assignments."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(
                t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)
            )
    return names


def imported_names(path: Path) -> list[str]:
    """Names a module binds by its top-level ``from ... import`` statements."""
    return [
        alias.asname or alias.name
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    ]


def public_names(module: ModuleType) -> set[str]:
    """What a public module offers: its ``__all__``, or else the public names it defines."""
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return set(declared)
    file = Path(module.__file__ or "")
    return {name for name in top_level_definitions(file) if not name.startswith("_")}


def public_modules() -> list[str]:
    """Every module whose path has no part that starts with an underscore."""
    return [name for name, _ in modules() if not any(p.startswith("_") for p in name.split("."))]


def test_every_public_name_is_exported_once_and_resolves() -> None:
    assert len(dispatcher.__all__) == len(set(dispatcher.__all__))
    for name in dispatcher.__all__:
        assert getattr(dispatcher, name) is not None, name


def test_every_exported_name_is_defined_in_exactly_one_module() -> None:
    definitions = {module: top_level_definitions(path) for module, path in modules()}
    exported = {
        (module, name)
        for module in ("dispatcher", "dispatcher.discovery")
        for name in importlib.import_module(module).__all__
    }
    for module, name in sorted(exported):
        value = getattr(importlib.import_module(module), name)
        where = [m for m, defined in definitions.items() if name in defined]
        assert len(where) == 1, f"{module}.{name} is defined in {where}"
        assert getattr(importlib.import_module(where[0]), name) is value, (module, name, where)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == where[0], (name, value.__module__, where)


def test_no_object_is_offered_under_two_public_module_paths() -> None:
    """``dispatcher`` offers every public name; besides it, at most one public module does."""
    assert public_modules() == [
        "dispatcher",
        "dispatcher.aio",
        "dispatcher.discovery",
        "dispatcher.errors",
        "dispatcher.gunicorn",
        "dispatcher.httpx",
        "dispatcher.otel",
        "dispatcher.prometheus",
        "dispatcher.requests",
        "dispatcher.servers",
    ]
    paths: dict[int, list[str]] = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in public_names(module):
            paths.setdefault(id(getattr(module, name)), []).append(f"{module_name}.{name}")
    for name in dispatcher.__all__:
        found = paths[id(getattr(dispatcher, name))]
        assert f"dispatcher.{name}" in found
        others = [path for path in found if path != f"dispatcher.{name}"]
        assert len(others) <= 1, f"{name} is offered as {found}"
        assert all(path.endswith(f".{name}") for path in others), found


@pytest.mark.parametrize("module", ["dispatcher", "dispatcher.discovery"])
def test_all_is_what_the_package_imports(module: str) -> None:
    path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    imported = imported_names(path)
    declared = importlib.import_module(module).__all__
    assert len(imported) == len(set(imported))
    assert sorted(declared) == sorted(imported)


def exception_types() -> list[type[BaseException]]:
    """Every public exception class defined anywhere in the package."""
    found: set[type[BaseException]] = set()
    for info in pkgutil.walk_packages(dispatcher.__path__, "dispatcher."):
        if info.name.endswith("__main__"):
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("dispatcher")
                and not value.__name__.startswith("_")
            ):
                found.add(value)
    return sorted(found, key=lambda error_type: error_type.__name__)


SAMPLES: dict[str, Callable[[], BaseException]] = {
    "BackendError": lambda: errors.BackendError(
        "h:1", "HTTP 503", status=503, response=dispatcher.HttpResponse(503, {"A": "1"}, b"x")
    ),
    "ConnectError": lambda: errors.ConnectError("h:1", "connecting: refused"),
    "ConnectTimeout": lambda: errors.ConnectTimeout("h:1", "connecting: timed out"),
    "TLSError": lambda: errors.TLSError("h:1", "TLS handshake: certificate verify failed"),
    "ReadTimeout": lambda: errors.ReadTimeout("h:1", "waiting for the answer: timed out"),
    "ProtocolError": lambda: errors.ProtocolError("h:1", "RemoteDisconnected"),
    "DuplicateBackend": lambda: errors.DuplicateBackend("h:1"),
    "UnknownBackend": lambda: errors.UnknownBackend("h:1"),
    "OptionMismatch": lambda: errors.OptionMismatch("api", "capacity", "16", "8"),
}
"""Errors whose constructor takes more than a message."""


def sample(error_type: type[BaseException]) -> BaseException:
    make = SAMPLES.get(error_type.__name__)
    return make() if make is not None else error_type(f"a {error_type.__name__}")


def test_every_error_is_exported_derives_from_the_base_and_pickles() -> None:
    found = exception_types()
    assert dispatcher.DispatcherError in found
    for error_type in found:
        name = error_type.__name__
        assert name in dispatcher.__all__, f"{name} is not exported from dispatcher"
        assert getattr(dispatcher, name) is error_type
        assert issubclass(error_type, dispatcher.DispatcherError), name
        assert error_type.__doc__, name
        error = sample(error_type)
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is error_type
        assert (str(copy), copy.args, vars(copy)) == (str(error), error.args, vars(error)), name
    exported = [getattr(dispatcher, name) for name in dispatcher.__all__]
    assert {e for e in exported if isinstance(e, type) and issubclass(e, Exception)} == set(found)
    died = pickle.loads(pickle.dumps(dispatcher.WorkerDied("worker 12 died")))
    assert str(died) == "worker 12 died"


# Private names stay in their module ---------------------------------------------------------

SEMLOCK_SEAM = {("dispatcher._lock", "_rebuild")}
"""`_lock.open_semaphore` opens a semaphore by name with ``_multiprocessing.SemLock._rebuild``:
the documented reach into CPython's internals, fenced by the Python version (see
`dispatcher._lock`)."""
PUBLIC_DESPITE_THE_NAME = {"_exit"}
"""``os._exit`` is documented public API of `os`."""


def private_reaches(module: str, path: Path) -> list[str]:
    return [f"line {line}: {text}" for line, _, text in sorted(_reaches(module, path))]


def _reaches(module: str, path: Path) -> Iterator[tuple[int, int, str]]:
    """Each use in `module` of another module's private name.

    ``from X import _name`` where ``X._name`` is not a module (private modules are imported
    for their public names), ``X._name`` where `X` is a module, and ``obj._name`` where the
    name is not one `module` defines or assigns itself.
    """
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    own: set[str] = set()
    modules_here: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.arg):
            own.add(node.arg)
        elif isinstance(node, ast.Import):
            modules_here.update((a.asname or a.name).partition(".")[0] for a in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{source}" if source else base
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if is_module(submodule):
                    modules_here.add(alias.asname or alias.name)
                elif is_private(alias.name):
                    yield node.lineno, node.col_offset, f"from {source} import {alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        if node.attr in PUBLIC_DESPITE_THE_NAME or (module, node.attr) in SEMLOCK_SEAM:
            continue
        on_module = isinstance(node.value, ast.Name) and node.value.id in modules_here
        if on_module or node.attr not in own:
            yield node.lineno, node.col_offset, ast.unparse(node)


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_no_module_reaches_into_another_modules_private_names() -> None:
    reaches = {module: private_reaches(module, path) for module, path in modules()}
    assert {module: found for module, found in reaches.items() if found} == {}
    assert any(module == "dispatcher._lock" for module, _ in SEMLOCK_SEAM)


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scan itself: each kind of reach is found, private modules and own names are not."""
    (tmp_path / "user.py").write_text(
        "from . import _state\n"
        "from ._state import SharedState, _helper\n"
        "from . import _layout as L\n"
        "class Mine:\n"
        "    def __init__(self) -> None:\n"
        "        self._own = 1\n"
        "    def use(self, other: object) -> object:\n"
        "        return self._own, L._private, other._theirs, _state.SharedState\n"
    )
    found = private_reaches("dispatcher.user", tmp_path / "user.py")
    assert found == [
        "line 2: from dispatcher._state import _helper",
        "line 8: L._private",
        "line 8: other._theirs",
    ]


# The SemLock seam and its version fence ----------------------------------------------------


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def test_this_python_is_one_the_semlock_seam_was_tested_on() -> None:
    low, high = _lock.SEMLOCK_TESTED
    assert low <= sys.version_info[:2] <= high, (
        f"run the suite, then extend dispatcher._lock.SEMLOCK_TESTED to {sys.version_info[:2]}"
    )


def test_a_python_that_cannot_make_a_named_lock_is_refused_naming_its_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def changed(*args: object) -> None:
        raise TypeError("SemLock() takes a state of another shape")

    monkeypatch.setattr(_lock._multiprocessing, "SemLock", changed)
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(SegmentError) as caught:
        Balancer(["10.0.0.1:80"], backend_factory=Echo, monitor=False)
    message = str(caught.value)
    assert message.startswith(f"Python {python_version()}: "), message
    assert "SemLock(kind, value, maxvalue, name, unlink)" in message
    low, high = (".".join(map(str, version)) for version in _lock.SEMLOCK_TESTED)
    assert f"tested on {low} to {high}" in message
    assert set(os.listdir("/dev/shm")) == before  # nothing was left half-made


@pytest.mark.parametrize("change", ["removed", "changed"])
def test_a_python_that_cannot_open_a_lock_by_name_is_refused_naming_its_version(
    change: str,
) -> None:
    def rebuild(*args: object) -> None:
        raise TypeError("_rebuild() takes a state of another shape")

    semlock = SimpleNamespace() if change == "removed" else SimpleNamespace(_rebuild=rebuild)
    with Balancer(["10.0.0.1:80"], backend_factory=Echo, monitor=False) as owner:
        with as_another_process(owner), pytest.MonkeyPatch.context() as patch:
            patch.setattr(_lock, "_multiprocessing", SimpleNamespace(SemLock=semlock))
            with pytest.raises(SegmentError) as caught:
                Balancer.attach(owner.name, backend_factory=Echo)
        message = str(caught.value)
        assert message.startswith(f"Python {python_version()}: "), message
        assert "SemLock._rebuild(handle, kind, maxvalue, name)" in message
        # Nothing was left half-open: the same attach works on a Python that has the parts.
        with (
            as_another_process(owner),
            Balancer.attach(owner.name, backend_factory=Echo) as attached,
        ):
            assert attached.invoke(None) == "10.0.0.1:80"
