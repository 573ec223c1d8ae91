"""Irreversible-backdoor stage 3: does the backdoor survive clean fine-tuning on the restricted domain?

Fine-tunes the irreversible model and the plain backdoored (stage-1) model under the same attacks and
records, after every epoch, clean accuracy, ASR, untargeted ASR and RA on the restricted test split.

    python irreversible_backdoor/stage3_eval/eval_backdoor_ASR.py
    python irreversible_backdoor/stage3_eval/eval_backdoor_ASR.py --path <stage-2 run> --lrs 1e-4,1e-3,1e-2
    python irreversible_backdoor/stage3_eval/eval_backdoor_ASR.py --defences ft,ft_sam,super_ft,fine_pruning,nad \
        --defences_only --train_fractions 0.05 --epochs 20   # backdoor defences instead of attacks
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common import cli, dist
from common.backdoor import ATTACK_METRICS, BackdoorEval, TriggerSettings, check_trigger
from common.cli import CommonSettings, RestrictedSettings, SpeedSettings
from common.checkpoints import foreign_record, is_foreign, model_from_checkpoint, require_given
from common.defences import DefenceSettings, check_arch
from common.procedures import check_flags, grid_settings
from common.runs import begin, config_of
from common.settings import Settings, compose, given_flags, parse, setting
from common.stage3 import choose_dataset, load_starts, restricted_data, run_stage3_script
from common.train import Precision
from common.verdicts import defence_verdicts, persistence_verdicts

PROJECT = "irreversible_backdoor"
STAGE = "irreversible_backdoor/stage3_eval"
MODEL_PATH = None  # irreversible checkpoint; None: newest under runs/irreversible_backdoor/stage2_train
BASELINE_PATH = None  # plain backdoored checkpoint; None: the irreversible model's parent, else newest stage 1
STARTS = ("irreversible", "backdoored")
EPOCHS = 100
FINETUNE_LR = 1e-4
BS = 64
SEED = 0
TRIGGER_FLAGS = ("trigger_size", "target_label", "poison_percent")
INHERITED = ("arch", "orig_dataset", "image_size") + TRIGGER_FLAGS  # flags left unset take the checkpoints'


@dataclass
class Models(Settings):
    path: Optional[Path] = setting(MODEL_PATH, "irreversible checkpoint or run folder; --model_path is the seed's "
                                               "spelling, kept for compatibility", type=Path, aliases=("model_path",))
    baseline_path: Optional[Path] = setting(BASELINE_PATH, "plain backdoored checkpoint or run folder", type=Path)


def parse_args(argv=None):
    settings = compose("Settings", CommonSettings, RestrictedSettings, TriggerSettings, grid_settings(STARTS),
                       DefenceSettings, Models, SpeedSettings)
    parser, args = parse(settings, argv, __doc__, globals())
    check_flags(args, given_flags(parser, argv))
    return parser, args


def start_sources(config):
    """{start: the checkpoint it loads} of the start models a run's config fine-tunes."""
    paths = {"irreversible": config.get("path"), "backdoored": config.get("baseline_path")}
    return {start: paths[start] for start in config["start"]}


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    starts = {}
    if "irreversible" in args.start:
        starts.update(load_starts(args, PROJECT, "stage2_train", [("irreversible", args.path)], "--path", INHERITED))
    if "backdoored" in args.start:
        parent = args.baseline_path or (starts["irreversible"].ckpt["parent"] if starts else None)
        starts.update(load_starts(args, PROJECT, "stage1_pretrain", [("backdoored", parent)], "--baseline_path",
                                  INHERITED))
    for start in starts.values():  # a foreign file records no trigger: some checkpoint of ours, or the flags, must
        if is_foreign(start.ckpt):
            require_given(args, TRIGGER_FLAGS, start.path, start.flag)
    check_arch(args.defences, args.arch)
    choose_dataset(args, {k: s for k, s in starts.items() if k == "irreversible"})
    train, test, orig_test = restricted_data(args, args.orig_dataset)
    num_classes = next(iter(starts.values())).ckpt["num_classes"]
    check_trigger(args.trigger_size, args.target_label, test.images.shape[-2:], num_classes)
    world = dist.world()
    device = world.device(args.device)
    precision = Precision(device, args.amp, args.channels_last)
    orig_eval = BackdoorEval(orig_test, args.trigger_size, args.target_label)
    orig_before = {}
    for label, start in starts.items() if world.main else ():  # for the report, which rank 0 writes
        figures = orig_eval(precision.prepare(model_from_checkpoint(start.ckpt, start.path)), device, precision)
        orig_before[label] = {k: figures[k] for k in ("test_acc", "asr", "ra")}
    paths = {label: start.path for label, start in starts.items()}
    ckpt = lambda label: starts[label].ckpt if label in starts else {}
    # a start not run records its flag as given, so that the same command line resumes the run
    given = {"irreversible": args.path, "backdoored": args.baseline_path}
    recorded = {k: None if paths.get(k, v) is None else str(paths.get(k, v)) for k, v in given.items()}
    config = config_of(args, stage=STAGE, parent=recorded["irreversible"], path=recorded["irreversible"],
                       baseline_path=recorded["backdoored"], **foreign_record(ckpt("irreversible")),
                       **foreign_record(ckpt("backdoored"), "baseline"))
    return run_stage3_script(
        args, interrupts, PROJECT, STAGE, starts={k: starts[k].ckpt["model"] for k in args.start},
        num_classes=num_classes, train=train, evaluator=BackdoorEval(test, args.trigger_size, args.target_label),
        config=config, metric_keys=["test_acc", *ATTACK_METRICS], verdict_fn=persistence_verdicts,
        sources_of=start_sources, defence_fn=defence_verdicts,
        title=f"Backdoor persistence under clean fine-tuning of {args.arch} on {args.dataset}",
        notes=[f"{k}: {v}" for k, v in paths.items()] + [
            f"original domain ({args.orig_dataset}) before fine-tuning, {k}: clean {v['test_acc']:.2f}, "
            f"ASR {v['asr']:.2f}, RA {v['ra']:.2f}" for k, v in orig_before.items()],
        extra_summary={"orig_before": orig_before})


if __name__ == "__main__":
    cli.run(main)
