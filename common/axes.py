"""Stage-3 procedures, the axes they declare, and the cells of a grid.

A stage-3 procedure (the fine-tuning attack, a backdoor defence, a linear probe, ...) declares its axes: the
coordinates that tell its cells apart. A cell's key (cells.jsonl, metrics.csv's `cell` column), its metrics.csv
columns, its entry in summary.json's results, the report's columns and the verdicts' families all come from
those declarations, and so do the flags a grid spans. The procedures are registered in common.procedures.
"""
import itertools
from dataclasses import dataclass
from typing import Optional

from common.cli import comma_list
from common.settings import setting

NO_DEFAULT = object()  # an axis every cell has had from the start: its key always shows it


@dataclass(frozen=True)
class Axis:
    """One coordinate of stage-3 cells.

    name: the attribute of a cell's settings, its metrics.csv column and its field in results.
    default: the value of a cell whose procedure does not declare the axis, or that was written before the
    axis existed; a key shows the axis only where the value differs from it, so the keys of older run folders
    still name their cells (NO_DEFAULT: always shown). key: the format of its part of the key (the parts in
    declaration order). label: its column in report.md.
    flag: the comma list a grid spans, one cell per item (items parsed by `type`, one of `choices`);
    `grid`: that flag's default, or None to take the single value of the flag `fallback`."""
    name: str
    type: object = str
    default: object = NO_DEFAULT
    key: str = "{}"
    label: str = None
    flag: str = None
    help: str = None
    choices: tuple = None
    grid: list = None
    fallback: str = None

    @property
    def blank(self):
        """The value of a cell that lacks the axis."""
        return None if self.default is NO_DEFAULT else self.default

    @property
    def dest(self):
        return self.flag[2:] if self.flag else None

    @property
    def title(self):
        return self.label or self.name

    def part(self, value):
        """The axis' part of a cell key; None where it is left out."""
        return None if self.default is not NO_DEFAULT and value == self.default else self.key.format(value)

    def values(self, args):
        """The axis' values over a grid: its flag's list, else the single value of its fallback flag."""
        given = getattr(args, self.dest, None) if self.flag else None
        if given is not None:
            return list(given)
        return [getattr(args, self.fallback)] if self.fallback else list(self.grid)

    def field(self):
        """(name, type, field) of the grid's settings (common.procedures.grid_settings): the comma list `flag`."""
        grid = self.grid
        return (self.dest, Optional[list], setting(help=self.help, type=comma_list(self.type, self.choices),
                                                   factory=lambda: None if grid is None else list(grid)))


def seed_last(axes):
    """`axes` with the seed moved to the end: metrics.csv's order, and the axis that varies fastest in a grid."""
    return [a for a in axes if a.name != "seed"] + [a for a in axes if a.name == "seed"]


class Procedure:
    """What a stage-3 cell does to its start model.

    A subclass sets `name`, `role` ("attack", chosen by --attacks; "defence", by --defences) and `axes` (in the
    order of the cell key), and defines
      make(epochs, **values): the settings of one cell from its values of the axes it spans (all but `fixed`),
        an object with an attribute per axis, `epochs`, and `procedure` (this procedure);
      run(model, domain, cell, device, precision, evaluate, on_epoch): the cell on `model`, in place, on the
        restricted training split `domain`; returns a common.finetune.AttackCurve of cell.epochs + 1
        evaluations (epoch 0 before the procedure touches the model), each reported to on_epoch as it comes.
    `cells(args)` spans the flags of its axes; `reads` names every flag it reads, so that a flag no chosen
    procedure reads can be refused; `fixed` names the axes it holds at one value for every cell (they say what
    it does in another procedure's terms, and tell none of its cells apart)."""
    name = role = None
    axes = fixed = ()

    def spanned(self):
        """The axes its grid spans (all but the fixed ones), the seed last."""
        return seed_last([a for a in self.axes if a.name not in self.fixed])

    def cells(self, args):
        """The settings of this procedure's cells over the grid's flags, the seed varying fastest."""
        axes = self.spanned()
        return [self.make(args.epochs, **{a.name: v for a, v in zip(axes, combo)})
                for combo in itertools.product(*(a.values(args) for a in axes))]

    @property
    def reads(self):
        return ("epochs",) + tuple(f for a in self.spanned() for f in (a.dest, a.fallback) if f)


@dataclass(frozen=True)
class Cell:
    """One (start model, procedure's cell settings) of a grid; `key` names it in cells.jsonl and metrics.csv."""
    start: str
    settings: object

    @property
    def key(self):
        parts = (a.part(getattr(self.settings, a.name)) for a in self.settings.procedure.axes)
        return "|".join([self.start, *(p for p in parts if p is not None)])

    def values(self, axes):
        """{axis name: value} over `axes` (the grid's): the cell's own where its procedure declares the axis."""
        own = {a.name for a in self.settings.procedure.axes}
        return {a.name: getattr(self.settings, a.name) if a.name in own else a.blank for a in axes}
