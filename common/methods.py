"""Stage-2 methods, by `--method` name: a method is one module plus one line in METHODS.

A method is a class the runner (common.stage2.Stage2Runner) drives, one outer loop per `step()`:

    build(settings, model, task, precision) -> method   classmethod; settings: the stage's (common.stage2),
                                                        task: common.stage2.Stage2Task (query loss, domains)
    losses, labels          the names of step()'s float values (checked finite: a non-finite one rolls the
                            loop back) and of its strings (what it drew), in metrics.csv's column order
    step() -> {name: float | str | None}                None: nothing to report this loop
    state_dict() / load_state_dict(state)               everything the next step() depends on (last.pt)
    snapshot() / restore(snapshot)                      the trained state a rollback returns to
    model, world, precision                             what the runner evaluates, and where
    settings (optional)                                 a common.settings.Settings dataclass of the method's own
                                                        flags (named after the method: --<method>_<name>); every
                                                        stage-2 script has them (common.stage2.stage2_settings)
"""
from common.condnum import CondNum
from common.repnoise import RepNoise
from common.sophon import Sophon

METHODS = {"sophon": Sophon,
           "repnoise": RepNoise,
           "condnum": CondNum}
