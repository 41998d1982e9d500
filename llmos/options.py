"""One config mechanism: a dataclass whose fields are at once a command's flags (`--vocab-size`) and a recipe's
TOML keys (`vocab_size = 4096`). `--recipe FILE` loads a recipe and flags override it; unknown keys and values
of the wrong type are errors, never silently ignored. Training stages, evals and `llmos serve` use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from llmos.errors import LlmosError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def option(default, help: str, choices=None):
    """A config field with its --help text (and the values it may take)."""
    return dataclasses.field(default=default, metadata={"help": help} | ({"choices": choices} if choices else {}))


def defaults(help: dict | None = None, **values):
    """Class decorator, placed under @dataclass: a stage's own defaults (and, in `help`, its own help) for options
    it inherits, so a shared option is declared once and each stage's config still states its best values.

        @dataclass
        @defaults(batch_size=8, help={"data": "preference pairs: a JSON or JSONL file"})
        class DPOConfig(FinetuneConfig): ...
    """
    def apply(cls):
        inherited = {}  # as @dataclass merges them: the nearest base's field wins
        for base in reversed(cls.__mro__[1:]):
            if dataclasses.is_dataclass(base):
                inherited |= {f.name: f for f in dataclasses.fields(base)}
        own = cls.__dict__.get("__annotations__")
        if own is None:
            own = cls.__annotations__ = {}
        for name in {**values, **(help or {})}:
            f = inherited[name]  # a KeyError here is a typo in the decorator, found on import
            default = values.get(name, f.default)
            metadata = {**f.metadata, **({"help": help[name]} if help and name in help else {})}
            own[name] = f.type
            setattr(cls, name, dataclasses.field(default=default, metadata=metadata))
        return cls

    return apply


def _types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def read_toml(path, example: str = "(see recipes/)") -> dict:
    """A recipe file's TOML as a dict, or one line saying why not."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise LlmosError(f"{path}: no such recipe file; pass a .toml file {example}") from None
    except tomllib.TOMLDecodeError as e:
        raise LlmosError(f"{path}: not valid TOML ({e})") from None


def load_recipe(path, cls) -> dict:
    """A TOML recipe as a dict of known keys with values of the right type."""
    recipe = read_toml(path)
    types = _types(cls)
    for key, value in recipe.items():
        if key not in types:
            raise LlmosError(f"{path}: unknown key {key!r}; known keys are {', '.join(sorted(types))}")
        want = types[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            recipe[key], ok = float(value), True
        if not ok:
            raise LlmosError(f"{path}: {key} = {value!r} should be a {want.__name__}")
    return recipe


def make_config(cls, values: dict | None = None, recipe=None):
    """cls from its defaults, then a recipe file, then `values` (flags); unknown keys are errors."""
    merged = load_recipe(recipe, cls) if recipe else {}
    values = {k: v for k, v in (values or {}).items() if v is not None}
    unknown = set(values) - set(_types(cls))
    if unknown:
        raise LlmosError(f"unknown option {sorted(unknown)[0]!r}; known options are {', '.join(sorted(_types(cls)))}")
    for group in getattr(cls, "EXCLUSIVE", ()):  # e.g. --steps on the command line replaces the recipe's minutes
        if any(k in values for k in group):
            merged = {k: v for k, v in merged.items() if k not in group}
    return cls(**{**merged, **values})


def parser_for(cls, prog: str, description: str, parser=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; every default is None so recipes can fill the gaps."""
    p = parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="TOML file with any of the options below; flags override it")
    for f in dataclasses.fields(cls):
        kind = _types(cls)[f.name]
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            metavar = {int: "N", float: "X"}.get(kind, f.name.upper())
            p.add_argument(flag, dest=f.name, type=kind, default=None, metavar=metavar, help=help)
    return p


def config_from_argv(cls, argv, prog: str, description: str, parser=argparse.ArgumentParser):
    args = vars(parser_for(cls, prog, description, parser).parse_args(argv))
    recipe = args.pop("recipe")
    return make_config(cls, args, recipe)
def add_flags(p: argparse.ArgumentParser, cls, names: list[str] | None = None) -> None:
    """One flag per field of `cls` (or of `names`), with the field's own default and help: the dataclass is the
    flags' only definition, so a command and the config it fills cannot disagree."""
    types = _types(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = types[f.name]
        kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None → X
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        help = f"{f.metadata.get('help', '')} (default {default})"
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=default, metavar={int: "N", float: "X"}.get(kind, f.name.upper()),
                           help=help, **extra)
