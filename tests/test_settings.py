"""Settings: a dataclass field is a flag (with its aliases and help), bad values are one-line usage errors,
a script's constants and a preset override the defaults, and a typed flag beats a preset."""
import sys
from dataclasses import dataclass

import pytest

from common import cli
from common.cli import PresetSettings, UsageError, comma_list, pos_int
from common.settings import Settings, compose, parse, setting
from common.stage2 import Stage2Settings
from helpers import SCRIPTS, load_script


@dataclass
class Toy(Settings):
    steps: int = setting(3, "inner steps", type=pos_int, aliases=("stepz",))
    kinds: list = setting("a", "kinds sampled", type=comma_list(str, ("a", "b", "c")))
    lo: int = setting(1, type=pos_int)
    hi: int = setting(2, type=pos_int)

    def __post_init__(self):
        super().__post_init__()
        if self.lo > self.hi:
            raise UsageError(f"--lo {self.lo} is above --hi {self.hi}")


ToyWithPresets = compose("ToyWithPresets", PresetSettings, Toy)
PRESETS = {"long": {"steps": 9, "kinds": "b,c"}}


def test_a_field_is_a_flag_with_its_alias_and_its_choices_in_the_help():
    parser, settings = parse(Toy, ["--stepz", "5", "--kinds", "c,a"], "toy")
    assert (settings.steps, settings.kinds) == (5, ["c", "a"])
    assert parse(Toy, ["--steps=6"], "toy")[1].steps == 6
    text = " ".join(parser.format_help().split())
    assert "--steps STEPS, --stepz STEPS inner steps (default: 3)" in text
    assert "(comma list of: a, b, c)" in text


@pytest.mark.parametrize("argv, needle", [(["--steps", "0"], "--steps"), (["--kinds", "a,z"], "--kinds"),
                                          (["--lo", "3"], "--lo 3 is above --hi 2")])
def test_a_bad_value_is_a_one_line_usage_error(argv, needle, capsys, monkeypatch):
    def main():
        parse(Toy, argv, "toy")

    monkeypatch.setattr(sys, "argv", ["toy.py", *argv])
    with pytest.raises(SystemExit) as info:
        cli.run(main)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("toy.py: error: ") and needle in lines[0], lines


def test_checks_run_when_settings_are_made_in_code_and_again_on_demand():
    with pytest.raises(UsageError, match="above"):
        Toy(lo=5)
    settings = Toy()
    assert settings.kinds == ["a"], "a default written as on the command line is parsed"
    settings.lo = 7
    with pytest.raises(UsageError, match="above"):
        settings.check()


def test_constants_override_defaults_by_lower_cased_name():
    constants = {"STEPS": 7, "KINDS": "b", "HI": 4, "STAGE": "not a field", "lo": 3}
    _, settings = parse(Toy, [], "toy", constants)
    assert (settings.steps, settings.kinds, settings.hi, settings.lo) == (7, ["b"], 4, 1)
    assert parse(Toy, ["--steps", "2"], "toy", constants)[1].steps == 2


def test_a_preset_overrides_defaults_and_a_typed_flag_beats_it_before_or_after():
    _, settings = parse(ToyWithPresets, ["--preset", "long"], "toy", presets=PRESETS)
    assert (settings.preset, settings.steps, settings.kinds) == ("long", 9, ["b", "c"])
    for argv in (["--preset", "long", "--steps", "4"], ["--steps", "4", "--preset", "long"]):
        _, settings = parse(ToyWithPresets, argv, "toy", presets=PRESETS)
        assert (settings.steps, settings.kinds) == (4, ["b", "c"])
    parser, _ = parse(ToyWithPresets, [], "toy", presets=PRESETS)
    assert "long: --steps 9 --kinds b,c" in " ".join(parser.format_help().split())


def test_a_flag_that_supersedes_drops_the_presets_value_and_both_typed_are_refused():
    supersedes = {"hi": ("steps",)}
    _, settings = parse(ToyWithPresets, ["--preset", "long", "--hi", "5"], "toy", presets=PRESETS, supersedes=supersedes)
    assert (settings.hi, settings.steps, settings.kinds) == (5, 3, ["b", "c"])
    with pytest.raises(UsageError, match="--hi takes the place of --steps"):
        parse(ToyWithPresets, ["--hi", "5", "--steps", "2"], "toy", presets=PRESETS, supersedes=supersedes)


def test_compose_keeps_the_groups_order_and_replaces_defaults():
    Both = compose("Both", PresetSettings, Toy, steps=11)
    assert list(vars(Both())) == ["preset", "steps", "kinds", "lo", "hi"]
    assert Both().steps == 11 and Toy().steps == 3


# ---- the real stage scripts -------------------------------------------------------------------------

def test_stage2_scripts_keep_the_seeds_aliases_and_override_only_what_differs():
    sophon, backdoor = load_script("stage2"), load_script("bd_stage2")
    _, args = sophon.parse_args(["--test_iterval", "3", "--truly_finetune_epochs", "0", "--datasets", "SVHN"])
    assert (args.test_interval, args.final_finetune_epochs, args.dataset) == (3, 0, "SVHN")
    _, plain = sophon.parse_args([])
    _, bd = backdoor.parse_args([])
    assert (plain.fts_head, plain.total_loop, plain.adaptation_steps) == (["reinit"], 1000, 50)
    assert (bd.fts_head, bd.total_loop, bd.adaptation_steps) == (["keep"], 300, 50)  # constants: FTS_HEAD, TOTAL_LOOP
    assert Stage2Settings().adaptation_steps == 50 and Stage2Settings().method == "sophon"


def test_a_range_leaves_no_unused_fast_lr_in_the_record_and_the_lr_rules_are_usage_errors():
    _, args = load_script("stage2").parse_args(["--fts_lr_range", "1e-4,1e-2"])
    assert args.fast_lr is None and args.simulated_lrs == (None,)
    with pytest.raises(UsageError, match="--fts_lr_range"):
        Stage2Settings(fts_lr_adapt=0.3)
    with pytest.raises(UsageError, match="--fts_lr_adapt"):
        Stage2Settings(fts_lr_learned_share=0.5)


@pytest.mark.parametrize("stage", ["stage1", "bd_stage1", "stage2", "bd_stage2"])
def test_every_converted_script_answers_help(stage, capsys):
    with pytest.raises(SystemExit) as info:
        load_script(stage).parse_args(["--help"])
    assert info.value.code == 0
    assert "--seed" in capsys.readouterr().out and SCRIPTS[stage].is_file()
