"""Command-line flags shared by the subcommands: every method option (generated from the method
registry), ``--device``/``--dtype``, and output paths checked before any work."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import methods

BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


@dataclass(frozen=True)
class Kind:
    """What one method option holds: ``"int"``, ``"float"``, ``"bool"``, ``"text"`` (optionally one
    of ``choices``), or ``"ints"``/``"floats"`` (tuples, written as comma lists)."""

    name: str
    choices: tuple[str, ...] = ()

    def parse(self, text: str) -> Any:
        """The value ``text`` stands for; raises ValueError saying what was expected."""
        if self.name in ("int", "float"):
            return _number(text, int if self.name == "int" else float, self.describe())
        if self.name in ("ints", "floats"):
            kind = int if self.name == "ints" else float
            return tuple(_number(part, kind, self.describe()) for part in text.split(","))
        if self.name == "bool":
            if text.strip().lower() not in BOOLS:
                raise ValueError(f"expected {self.describe()}, got {text!r}")
            return BOOLS[text.strip().lower()]
        if self.choices and text not in self.choices:
            raise ValueError(f"expected {self.describe()}, got {text!r}")
        return text

    def describe(self) -> str:
        return {"int": "an integer", "float": "a number", "bool": "true or false",
                "ints": "comma-separated integers", "floats": "comma-separated numbers",
                }.get(self.name) or (f"one of {', '.join(self.choices)}" if self.choices else "text")

    @property
    def metavar(self) -> str | None:
        """How ``--help`` shows the value (None: the option's name)."""
        if self.choices:
            return "{" + ",".join(self.choices) + "}"
        return {"int": "N", "float": "X", "bool": "BOOL", "ints": "N[,N...]", "floats": "X[,X...]"}.get(self.name)


def _number(text: str, kind: Callable[[str], Any], expected: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {expected}, got {text!r}") from None


def kind_of(annotation: Any) -> Kind:
    """The :class:`Kind` of a method field's resolved annotation (``None`` members of unions are
    dropped; a union with ``str`` in it, such as ``Recipe | str``, is text; a number or a tuple of
    them, such as ``float | tuple[float, ...]``, is the tuple's kind)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return Kind("text", tuple(str(a) for a in args))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        kinds = {kind_of(m).name for m in members}
        if str not in members and len(kinds) == 2 and kinds in ({"float", "floats"}, {"int", "ints"}):
            return Kind(max(kinds, key=len))  # one number, or a tuple of them (a value per layer)
        return Kind("text") if str in members or len(members) != 1 else kind_of(members[0])
    if origin is tuple and args:
        return Kind({int: "ints", float: "floats"}.get(args[0], "text"))
    return Kind({bool: "bool", int: "int", float: "float"}.get(annotation, "text"))


@dataclass
class MethodOption:
    """One option name over the registry: its kind and default in each method that takes it."""

    name: str
    kinds: dict[str, Kind]
    defaults: dict[str, Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> Kind:
        """The one kind every method gives this option, or the widest reading of all of them: numbers
        or comma lists of numbers (``keep``), the union of the choices (``positions``), else text."""
        kinds = set(self.kinds.values())
        names = {k.name for k in kinds}
        if len(kinds) == 1:
            return kinds.pop()
        if names <= {"text"} and all(k.choices for k in kinds):
            return Kind("text", tuple(dict.fromkeys(c for k in self.kinds.values() for c in k.choices)))
        if names <= {"int", "float", "ints", "floats"}:
            return Kind("floats" if names & {"ints", "floats"} else "float")
        return Kind("text")

    def argparse_type(self, text: str) -> str:
        """Accept ``text`` when some method could read it as this option (it is converted for the
        chosen method by :func:`method_options`); argparse names the flag and the error otherwise."""
        try:
            self.kind.parse(text)
        except ValueError:
            kinds = [self.kind] if self.kind.choices else self.kinds.values()
            expected = " or ".join(dict.fromkeys(k.describe() for k in kinds))
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return text

    def help(self) -> str:
        """``"fastv, dart (default 2); random (default 0)"``: who takes it, with what default."""
        by_default: dict[str, list[str]] = {}
        for method, default in self.defaults.items():
            by_default.setdefault(_show(default), []).append(method)
        return "; ".join(f"{', '.join(names)} (default {d})" for d, names in by_default.items())


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def registry_options() -> dict[str, MethodOption]:
    """Every option of every registered method, by name, in registry order."""
    found: dict[str, MethodOption] = {}
    for method, cls in methods.REGISTRY.items():
        hints = typing.get_type_hints(cls)
        for field in cls.options().values():
            option = found.setdefault(field.name, MethodOption(field.name, {}, {}))
            option.kinds[method] = kind_of(hints[field.name])
            option.defaults[method] = None if field.default is dataclasses.MISSING else field.default
    return found


def add_method_flags(parser: argparse.ArgumentParser, default_method: str | None = "none",
                     method_help: str = "method name (`tokensieve methods` lists them)") -> None:
    """``--method`` and one flag per method option of the registry (``merge_keep`` -> ``--merge-keep``).

    Call it after the subcommand's own flags: an option whose flag the subcommand already has (flops'
    ``--schedule`` file) is left out there, and the subcommand's flag keeps its meaning."""
    parser.add_argument("--method", default=default_method, help=method_help)
    group = parser.add_argument_group("method options (each only with a method that takes it)")
    added = []
    for option in registry_options().values():
        switch = {"nargs": "?", "const": "true"} if option.kind.name == "bool" else {}
        try:
            group.add_argument(option.flag, dest=option.name, type=option.argparse_type, default=None,
                               metavar=option.kind.metavar, help=option.help(), **switch)
        except argparse.ArgumentError:  # the subcommand's own flag
            continue
        added.append(option.name)
    parser.set_defaults(method_flags=tuple(added))


def method_options(args: argparse.Namespace, method: str | None) -> dict[str, Any]:
    """The method flags that were given, converted for ``method``.

    Raises:
        ValueError: an unknown method (the closest names are suggested), a flag without a method, a
            flag ``method`` does not take (its flags are listed), or a value it cannot read.
    """
    registry = registry_options()
    given = {name: getattr(args, name) for name in args.method_flags if getattr(args, name) is not None}
    if method is not None and "+" in method:
        args.method, options = composition_options(method, given)
        return options
    if method is None:
        if given:
            raise ValueError(f"{', '.join(registry[n].flag for n in given)}: method options need --method")
        return {}
    if method not in methods.REGISTRY:
        methods.get(method)  # raises, naming the closest methods
    taken = methods.REGISTRY[method].options()
    bad = [registry[n].flag for n in given if n not in taken]
    if bad:
        flags = ", ".join(registry[n].flag for n in taken) or "no options"
        raise ValueError(f"method {method!r} takes no {', '.join(bad)}; it takes {flags}")
    options = {}
    for name, text in given.items():
        try:
            options[name] = registry[name].kinds[method].parse(text)
        except ValueError as err:
            raise ValueError(f"{registry[name].flag} for {method}: {err}") from None
    return options


def composition_options(spec: str, given: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """``"divprune:keep=0.5+fastv:layer=2,keep=0.25"`` as its members' names joined by ``+`` and the
    options :func:`tokensieve.methods.get` takes for them (each member's under its name). A value
    holding commas (``pdrop:layers=1,2,3``) continues up to the next ``key=``. Of the flat flags
    (``given``), only ``--flops`` is taken: the composition's budget, split among its members.

    Raises:
        ValueError: an unknown member or option, a value it cannot read, or another flat flag.
    """
    registry = registry_options()
    stray = [registry[n].flag for n in given if n != "flops"]
    if stray:
        raise ValueError(f"{', '.join(stray)} with a composition: give each member its options in --method, "
                         "as in divprune:keep=0.5+fastv:layer=2,keep=0.25")
    names: list[str] = []
    options: dict[str, Any] = {}
    for part in spec.split("+"):
        name, _, text = part.strip().partition(":")
        if name not in methods.REGISTRY:
            methods.get(name)  # raises, naming the closest methods
        pairs: list[list[str]] = []
        for piece in filter(None, text.split(",")):
            if "=" in piece:
                pairs.append(piece.split("=", 1))
            elif pairs:
                pairs[-1][1] += "," + piece
            else:
                raise ValueError(f"{part!r}: expected key=value after {name}:")
        taken = methods.REGISTRY[name].options()
        member = {}
        for key, value in pairs:
            key = key.strip().replace("-", "_")
            if key not in taken:
                raise ValueError(f"method {name!r} takes no option {key!r}; it takes {', '.join(taken) or 'none'}")
            try:
                member[key] = registry[key].kinds[name].parse(value)
            except ValueError as err:
                raise ValueError(f"{key} for {name}: {err}") from None
        names.append(name)
        options[name] = member
    if "flops" in given:
        options["flops"] = float(given["flops"])
    return "+".join(names), options


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``, for every subcommand that loads a model."""
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights and activations (default: float32 on the CPU, bfloat16 on a GPU)")


def add_protocol_flag(parser: argparse.ArgumentParser) -> None:
    """``--protocol``: how each prompt reaches the model (see :mod:`tokensieve.protocols`)."""
    from ..protocols import PROTOCOLS

    parser.add_argument("--protocol", default="auto", choices=PROTOCOLS,
                        help="'whole': one prefill of the prompt; 'question-after': the context is prefilled "
                             "(and compressed) first, the question fed after it, as kvpress evaluates; "
                             "'auto': question-after for a text model, whole for a VLM")


def check_output_file(path: Path, flag: str) -> None:
    """Raise ValueError, before any work, unless ``path`` can be written as a file (its folder may be
    created): not an existing directory, and no regular file where a parent folder must be."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    _check_parents(path, flag)


def check_output_dir(path: Path, flag: str) -> None:
    """Raise ValueError, before any work, unless ``path`` is or can become a directory."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            return
