"""Name -> method registries (quantizers, post-training algorithms), each method with its own options dataclass.

A method registers itself where it is defined (``@register_quantizer("pact", options=PACTOptions)``); the
registry imports every module of its package on the first lookup, so adding a method is one new file. The
options dataclass of a method lists the recipe keys that only that method reads, and checks their ranges.
This module is the lowest layer of the package: it imports the standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

H = TypeVar("H")


class OptionError(ValueError):
    """An option value out of range: raised by an options dataclass's ``check()``.

    ``key`` is the option's name within its section (``clip_init``); the recipes layer adds the section and
    the file (``pact_w4a4.yaml: activations.clip_init=-1 ...``).
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not allowed; {allowed}")
        self.key = key
        self.value = value
        self.allowed = allowed


@dataclass
class NoOptions:
    """The options of a method that has none of its own (it reads only its section's common keys)."""


def option_keys(options: type) -> list[str]:
    """The keys an options dataclass takes, in declaration order."""
    return [f.name for f in dataclasses.fields(options)]


def check_options(options: Any) -> None:
    """Run ``options.check()`` where the options class defines one (raises :class:`OptionError`)."""
    check = getattr(options, "check", None)
    if check is not None:
        check()


@dataclass(frozen=True)
class Method(Generic[H]):
    """One registered method: its name, what implements it, its options dataclass and the file defining it."""

    name: str
    handler: H  # a Quantizer subclass, or an algorithm function
    options: type[Any]  # the options dataclass (NoOptions when the method has none)
    file: str  # source file of ``handler``: recipe -> method name -> this file

    def option_names(self) -> list[str]:
        """The option keys this method takes."""
        return option_keys(self.options)

    def make_options(self, base: Any = None, **values: Any) -> Any:
        """An options instance: ``base`` (or the defaults) with ``values`` replaced; unknown keys raise TypeError."""
        unknown = sorted(set(values) - set(self.option_names()))
        if unknown:
            takes = ", ".join(self.option_names()) or "no options of its own"
            raise TypeError(f"{unknown[0]} does not apply to {self.name}; {self.name} takes: {takes}")
        if base is None:
            return self.options(**values)
        if not isinstance(base, self.options):
            raise TypeError(f"options {type(base).__name__} are not those of {self.name} ({self.options.__name__})")
        return dataclasses.replace(base, **values)


class Registry(Generic[H]):
    """Name -> :class:`Method`, filled by ``register`` decorators in the modules of ``package``.

    Every module of ``package`` is imported on the first lookup (not on registration), so a method is
    found without being imported by hand anywhere. A higher layer whose methods bring their own quantizer (a
    post-training algorithm with state of its own, such as AWQ's scales) adds its package with
    :meth:`also_discover`, so the lower layer never imports the higher one by name.
    """

    def __init__(self, what: str, package: str) -> None:
        self.what = what  # "quantizer method", "post-training algorithm": used in messages
        self.package = package
        self.packages = [package]
        self._methods: dict[str, Method[H]] = {}
        self._discovered = False
        self._discovering = False

    def register(self, name: str, options: Optional[type] = None) -> Callable[[H], H]:
        """Decorator (class or function): make ``handler`` selectable by ``name``, with its options dataclass."""
        opts = NoOptions if options is None else options
        if not dataclasses.is_dataclass(opts):
            raise TypeError(f"{self.what} {name!r}: options must be a dataclass, got {opts!r}")

        def wrap(handler: H) -> H:
            if name in self._methods and self._methods[name].handler is not handler:
                old = self._methods[name].file
                raise ValueError(f"{self.what} {name!r} is registered twice ({old} and {_source_file(handler)})")
            self._methods[name] = Method(name, handler, opts, _source_file(handler))
            return handler

        return wrap

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a method registered for a test, for instance)."""
        self._discover()
        del self._methods[name]

    def also_discover(self, package: str) -> None:
        """Import the modules of ``package`` too on the next lookup (they register methods here)."""
        if package not in self.packages:
            self.packages.append(package)
            self._discovered = False

    def _discover(self) -> None:
        if self._discovered or self._discovering:
            return
        self._discovering = True
        try:
            for name in self.packages:
                package = importlib.import_module(name)
                for info in pkgutil.iter_modules(package.__path__):
                    importlib.import_module(f"{name}.{info.name}")
            self._discovered = True
        finally:
            self._discovering = False

    def names(self) -> list[str]:
        """Sorted names of every registered method."""
        self._discover()
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> Method[H]:
        self._discover()
        if name not in self._methods:
            names = sorted(self._methods)
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {self.what} {name!r}; allowed: {names}{hint}")
        return self._methods[name]


def _source_file(handler: Any) -> str:
    try:
        return inspect.getsourcefile(handler) or "<unknown>"
    except TypeError:
        return "<unknown>"
