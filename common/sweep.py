"""The tuned attacker's lr sweep, phase 1 of common.tuned's suite: a fine-tuning cell scored on the attacker's own
held-out split of its training data, never on the test split.

A sweep cell is a fine-tuning attack (common.finetune.run_attack) with one more axis, `sweep`, the held-out share:
its key ends in `sweep0.2`, so it never names an ordinary cell, and metrics.csv's `sweep` column marks its rows.
The attacker's data (attack_subset at the cell's train fraction) is split once, stratified per class, by a
generator of its own seed (HOLDOUT_SEED): the same split for every start model, lr and seed. The cell fine-tunes on
the rest and reports its held-out accuracy as `heldout_acc` (its `test_acc` stays empty).
"""
from dataclasses import dataclass, replace

import torch

from common.axes import Axis, Procedure
from common.cli import UsageError, fraction
from common.finetune import FINE_TUNING, Attack, attack_subset, run_attack, subset_indices
from common.train import AccuracyEval

HOLDOUT_SHARE = 0.2  # share of the attacker's training data held out to score the sweep (stratified per class)
HOLDOUT_SEED = 20250303  # fixed, unlike any cell seed: one split for every start model, lr and seed
HELDOUT_KEY = "heldout_acc"  # a sweep cell's metric: accuracy (%) on the held-out split

SWEEP_AXIS = Axis("sweep", fraction, default=None, key="sweep{:g}", label="sweep held-out share",
                  grid=[HOLDOUT_SHARE])


@dataclass(frozen=True)
class SweepCell(Attack):
    """A fine-tuning attack scored on the held-out share `sweep` of the attacker's data."""
    sweep: float = HOLDOUT_SHARE

    @property
    def procedure(self):
        return SWEEP


def holdout_split(domain, share):
    """(fit, held): `domain` split into the part the attacker fine-tunes on and the fixed stratified share it
    scores on (common.finetune.subset_indices seeded with HOLDOUT_SEED); disjoint, together all of `domain`."""
    held = torch.zeros(len(domain), dtype=torch.bool)
    held[subset_indices(domain.labels, share, seed=HOLDOUT_SEED)] = True
    if int(held.sum()) < 1 or int((~held).sum()) < 2:
        raise UsageError(f"the tuned suite's held-out share {share:g} of {len(domain)} attacker samples leaves "
                         f"{int(held.sum())} to score and {int((~held).sum())} to fine-tune on; give more data "
                         f"(--train_fractions, --subset)")

    def part(mask, what):
        return replace(domain, images=domain.images[mask], labels=domain.labels[mask], _stats={},
                       note=(domain.note + " " if domain.note else "")
                       + f"sweep {what}: {int(mask.sum())} of {len(domain)} attacker samples")
    return part(~held, "fit part"), part(held, f"held-out {share:g}")


class Sweep(Procedure):
    """The fine-tuning attack on the attacker's fit part, scored on its held-out part (common.tuned plans it)."""
    name, role = "sweep", "tuning"
    axes = FINE_TUNING.axes + (SWEEP_AXIS,)
    reads = ()  # its cells come from the fine-tuning attack's flags, through the suite, never from a flag of its own

    def make(self, epochs, strategy, optimizer, lr, batch_size, seed, train_fraction, schedule, sweep):
        return SweepCell(strategy, optimizer, float(lr), int(batch_size), epochs, int(seed), float(train_fraction),
                         schedule, float(sweep))

    @staticmethod
    def split(domain, cell):
        """(fit, held) of the cell's attacker data: the same for every start model, lr and seed."""
        return holdout_split(attack_subset(domain, cell.train_fraction), cell.sweep)

    def run(self, model, domain, cell, device, precision, evaluate, on_epoch=None):
        fit, held = self.split(domain, cell)
        score = AccuracyEval(held, key=HELDOUT_KEY)
        return run_attack(model, fit, replace(cell, train_fraction=1.0), device, precision,
                          lambda m: score(m, device, precision), on_epoch)


SWEEP = Sweep()
