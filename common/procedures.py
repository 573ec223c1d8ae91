"""The registry of stage-3 procedures, and what a grid derives from their declarations.

A new procedure (an attack, a linear probe, a tuned attacker): a module with a common.axes.Procedure subclass
(its name, role, axes, `make` and `run`) and its line in PROCEDURES. A new defence: its function and its line in
common.defences.DEFENCES. The rest follows from the declarations: the cell keys, metrics.csv's columns, the
results, the report's columns, the verdicts' families, the flags of the axes, and which flags a grid leaves unread.
"""
from dataclasses import make_dataclass
from pathlib import Path
from typing import Optional

from common.axes import seed_last
from common.cli import UsageError, comma_list, pos_float, pos_int
from common.settings import Settings, setting
from common.defences import DEFENCES
from common.finetune import FINE_TUNING
from common.sweep import SWEEP

PROCEDURES = {p.name: p for p in (
    FINE_TUNING,
    *DEFENCES.values(),
    SWEEP,  # role "tuning": no flag chooses it; common.tuned's suite plans its cells
)}
# role -> (the flag choosing its procedures, the axis naming them in keys and rows; the fine-tuning attack's
# keys predate the registry, so attacks have none)
ROLES = {"attack": ("attacks", None), "defence": ("defences", "defence")}


def chosen(args):
    """The procedures a grid runs: those of --attacks (none under --defences_only), then of --defences."""
    attacks = [] if getattr(args, "defences_only", False) else getattr(args, "attacks", None) or []
    return [PROCEDURES[name] for name in attacks + (getattr(args, "defences", None) or [])]


def plan(args, role=None):
    """The settings of every cell the grid runs (of the procedures of `role`), procedure by procedure."""
    return [cell for p in chosen(args) if role in (None, p.role) for cell in p.cells(args)]


def axes(role=None):
    """Every axis the registered procedures (of `role`) declare, once each, in the order of the registry."""
    found = {}
    for p in PROCEDURES.values():
        if role in (None, p.role):
            for a in p.axes:
                found.setdefault(a.name, a)
    return list(found.values())


def columns():
    """metrics.csv's axis columns (and every cell's fields in cells.jsonl and the results): the seed last."""
    return seed_last(axes())


def family(role):
    """The fields that group the results of a role's cells into families, seeds pooled: the role's naming axis,
    then its other axes but the seed and those every procedure of the role holds fixed (Procedure.fixed)."""
    named = ROLES[role][1]
    procedures = [p for p in PROCEDURES.values() if p.role == role]
    fixed = set.intersection(*(set(p.fixed) for p in procedures)) if procedures else set()
    rest = [a.name for a in axes(role) if a.name not in fixed | {"seed", named}]
    return tuple(([named] if named else []) + rest)


def grid_keys():
    """The flags that only choose which cells a grid has (a cell's key names its values): the axes' lists and
    the single values they fall back to, the procedures, the start models and the suite (common.tuned). Not --seed:
    it seeds the run too."""
    flags = {f for a in axes() for f in (a.dest, a.fallback) if f} - {"seed"}
    return flags | {flag for flag, _ in ROLES.values()} | {"defences_only", "start", "suite"}


def grid_settings(starts, optional_starts=()):
    """The grid's settings group: the start models (`starts` by default, `optional_starts` when asked), the epochs,
    the attacks, every registered axis's list (common.defences.DefenceSettings has the defences') and --reuse_cells.
    Built from the registry when called, so an axis registered later has its flag too."""
    choices = tuple(starts) + tuple(optional_starts)
    attacks = tuple(name for name, proc in PROCEDURES.items() if proc.role == "attack")
    return make_dataclass("GridSettings", [
        ("start", list, setting(",".join(starts), f"start models to fine-tune (any of {','.join(choices)}); under "
                                "torchrun write --starts: torchrun's own parser takes --start for its --start-method",
                                type=comma_list(str, choices), aliases=("starts",))),
        ("epochs", int, setting(20, "fine-tuning epochs per attack", type=pos_int)),
        ("finetune_lr", float, setting(1e-4, type=pos_float)),
        ("attacks", list, setting(FINE_TUNING.name, "stage-3 attacks to run, each over the grid of its axes",
                                  type=comma_list(str, attacks))),
        *(a.field() for a in axes() if a.flag),
        ("reuse_cells", Optional[Path], setting(None, "another stage-3 run folder of the same settings: its finished "
                                                "cells of the start models both grids fine-tune from the same "
                                                "checkpoint (scratch, say) are copied into this run instead of run "
                                                "again", type=Path, metavar="RUN"))], bases=(Settings,))


def check_flags(args, given):
    """Refuse --defences_only without defences, and a flag (`given`: the dest names typed, common.cli.given_flags)
    that registered procedures read but none of the chosen ones does."""
    only = getattr(args, "defences_only", False)
    if only and not args.defences:
        raise UsageError("--defences_only needs --defences")
    mine = {flag for p in chosen(args) for flag in p.reads}
    readers = {}
    for p in PROCEDURES.values():
        for flag in p.reads:
            if flag in given and flag not in mine and p.name not in readers.setdefault(flag, []):
                readers[flag].append(p.name)
    idle = [f"--{flag}" for flag, names in readers.items() if {PROCEDURES[n].role for n in names} == {"attack"}]
    if only and idle:
        raise UsageError(f"--defences_only runs no fine-tuning attack, so {', '.join(idle)} would be unused")
    for flag, names in readers.items():
        raise UsageError(f"--{flag} is read by {', '.join(names)} only, and "
                         f"--{ROLES[PROCEDURES[names[0]].role][0]} names none of them")
