"""Settings: a stage's settings are one dataclass, and its command line is generated from the fields.

A field is declared once with `setting(default, help=..., type=..., choices=..., aliases=...)`; range and
consistency checks live in the dataclass's `__post_init__` and raise `UsageError` (one line, exit 2). A
script's UPPER_CASE constants and a preset are both overrides of the field defaults: `parse` matches the
constants to fields by lower-cased name.

Our own short module rather than tyro or simple-parsing: both derive the flags from the fields, but we must
keep argparse underneath (common.runs compares the typed flags with a resumed run's config through the
parser, `given_flags`), the seed's aliases (--test_iterval, --truly_finetune_epochs, --datasets) and our
validators' one-line errors, presets that only change defaults (a typed flag, before or after --preset,
still wins; `supersedes`), and a record (config.json) equal to what the hand-written parsers gave.

Groups of fields shared by several scripts (common flags, speed flags, the trigger...) are dataclasses
too; `compose` joins groups into one settings class, fields in the order given.
"""
import argparse
import copy
import sys
from dataclasses import MISSING, dataclass, field, fields


class UsageError(Exception):
    """A bad input the user can fix: reported in one line, exit code 2 (common.cli.run)."""


class Parser(argparse.ArgumentParser):
    """argparse without the usage dump: errors become UsageError (one line, exit 2)."""

    def error(self, message):
        raise UsageError(message)


def setting(default=None, help=None, *, type=None, choices=None, aliases=(), metavar=None, action=None,
            factory=None):
    """A settings field. `type` parses and checks the command-line text (common.cli's validators; a comma
    list's own choices are listed in the generated help, so help and table cannot drift); `aliases`: further
    spellings of the flag; `factory`: a default computed when the parser is built (e.g. from the environment).
    A string default is parsed as if typed, as argparse does."""
    meta = dict(help=help, type=type, choices=choices, aliases=tuple(aliases), metavar=metavar, action=action,
                factory=factory)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """Base of every settings group. Subclasses chain their checks: `super().__post_init__()` first."""

    def __post_init__(self):
        for f in fields(self):
            convert, value = f.metadata.get("type"), getattr(self, f.name)
            if isinstance(value, str) and convert is not None:  # a default written as on the command line
                try:
                    setattr(self, f.name, convert(value))
                except argparse.ArgumentTypeError as err:
                    raise UsageError(f"argument --{f.name}: {err}") from None

    def check(self):
        """Run the checks again: --resume and a parent checkpoint fill values in after parsing."""
        self.__post_init__()


def compose(name, *groups, **defaults):
    """One settings class made of `groups`, their fields in the order given (plain multiple inheritance
    would put the last base's fields first); `defaults` replace some fields' defaults."""
    namespace = {"__module__": groups[0].__module__, "__annotations__": {}}
    for f in (f for group in groups for f in fields(group) if f.name in defaults):
        namespace["__annotations__"][f.name] = f.type
        namespace[f.name] = field(default=defaults[f.name], metadata=f.metadata)
    return dataclass(type(name, tuple(reversed(groups)), namespace))


def settings_group(config):
    """A settings group made from the dataclass `config` (frozen, say, so it can be a default), whose fields were
    declared with `setting`: the same fields, defaults and flags. A run's hyper-parameters are then declared once,
    where the code that reads them lives."""
    return dataclass(type(f"{config.__name__}Settings", (Settings,), {
        "__module__": config.__module__, "__annotations__": {f.name: f.type for f in fields(config)},
        **{f.name: field(default=f.default, metadata=f.metadata) for f in fields(config)}}))


def defaults_of(cls, constants=None, **overrides):
    """Field name -> default: the field's own, then a matching UPPER_CASE constant, then `overrides`."""
    values = {}
    for f in fields(cls):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    values.update({k.lower(): v for k, v in (constants or {}).items() if k.isupper() and k.lower() in values})
    values.update({k: v for k, v in overrides.items() if k in values})
    return values


def add_arguments(parser, cls, defaults):
    for f in fields(cls):
        meta = f.metadata
        kwargs = {k: meta[k] for k in ("type", "choices", "metavar", "action") if meta[k] is not None}
        listed = getattr(meta["type"], "choices", None)  # a comma list of choices
        help = f"{meta['help']} (comma list of: {', '.join(listed)})" if listed else meta["help"]
        parser.add_argument(f"--{f.name}", *(f"--{a}" for a in meta["aliases"]), dest=f.name,
                            default=defaults[f.name], help=help, **kwargs)
    return parser


def build_parser(doc, parents=()):
    # no abbreviations: --resume compares the flags given with the run's config, by their full names
    return Parser(description=next(iter((doc or "").strip().splitlines()), ""), parents=list(parents), allow_abbrev=False,
                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def parse(cls, argv=None, doc="", constants=None, presets=None, supersedes=None):
    """(parser, settings) from argv; defaults from `constants` (a script's globals()), then the preset."""
    parser = add_arguments(build_parser(doc), cls, defaults_of(cls, constants))
    if presets:
        action = next(a for a in parser._actions if a.dest == "preset")
        action.choices = tuple(presets)
        action.help = "named configuration (" + "; ".join(
            f"{name}: " + " ".join(f"--{k} {v}" for k, v in values.items()) for name, values in presets.items()) + ")"
    namespace = parse_with_presets(parser, argv, presets or {}, supersedes)
    return parser, cls(**vars(namespace))


def parse_with_presets(parser, argv, presets, supersedes=None):
    """parser.parse_args(argv) with the chosen preset's values as defaults. `supersedes` maps a flag to the
    flags it takes the place of (--fts_lrs to --fts_lr_range): typed on the command line, it drops the
    preset's values for those, so the flag typed is the one that runs; typing both is refused."""
    args = parser.parse_args(argv)  # refuses bad input and answers --help before the probe below re-parses
    typed = given_flags(parser, argv)
    replaced = {name: flag for flag in typed for name in (supersedes or {}).get(flag, ())}
    for name, flag in replaced.items():
        if name in typed:
            parser.error(f"--{flag} takes the place of --{name}; give one of them")
    if getattr(args, "preset", None) in presets:
        parser.set_defaults(**{k: v for k, v in presets[args.preset].items() if k not in replaced})
        args = parser.parse_args(argv)
    return args


def given_flags(parser, argv=None):
    """Dest names of the flags present in argv: argv re-parsed with every default suppressed, so aliases and
    --flag=value forms count."""
    argv = sys.argv[1:] if argv is None else list(argv)
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))

