"""Irreversible-backdoor stage 3: does the backdoor survive clean fine-tuning on the restricted domain?

Fine-tunes the irreversible model and the plain backdoored (stage-1) model under the same attacks and
records, after every epoch, clean accuracy, ASR, untargeted ASR and RA on the restricted test split.

    python irreversible_backdoor/stage3_eval/eval_backdoor_ASR.py
    python irreversible_backdoor/stage3_eval/eval_backdoor_ASR.py --path <stage-2 run> --lrs 1e-4,1e-3,1e-2
    python irreversible_backdoor/stage3_eval/eval_backdoor_ASR.py --defences ft,ft_sam,super_ft,fine_pruning,nad \
        --defences_only --train_fractions 0.05 --epochs 20   # backdoor defences instead of attacks
"""
from functools import partial
from pathlib import Path

from common import cli, dist
from common.backdoor import ATTACK_METRICS, BackdoorEval, check_trigger, trigger_flags
from common.checkpoints import (foreign_record, inherit, is_foreign, load_parent, model_from_checkpoint, require_given,
                                resolve_checkpoint)
from common.data import check_name, check_subset_caps, load_domain
from common.defences import check_arch, check_flags, defence_flags
from common.finetune import grid_flags
from common.runs import begin, config_of
from common.stage3 import run_stage3_script
from common.train import Precision
from common.verdicts import defence_verdicts, persistence_verdicts

STAGE = "irreversible_backdoor/stage3_eval"
MODEL_PATH = None  # irreversible checkpoint; None: newest under runs/irreversible_backdoor/stage2_train
BASELINE_PATH = None  # plain backdoored checkpoint; None: the irreversible model's parent, else newest stage 1
STARTS = ("irreversible", "backdoored")
EPOCHS = 100
FINETUNE_LR = 1e-4
BS = 64
SEED = 0
TRIGGER_FLAGS = ("trigger_size", "target_label", "poison_percent")


def parse_args(argv=None):
    common = cli.common_flags(arch=None, orig_dataset=None, bs=BS, seed=SEED, inherit=True)
    parser = cli.build_parser(__doc__, [common, cli.restricted_flag(None), trigger_flags(),
                                        grid_flags(EPOCHS, FINETUNE_LR, BS, STARTS), defence_flags(),
                                        cli.speed_flags()])
    parser.add_argument("--path", "--model_path", dest="path", type=Path, default=MODEL_PATH,
                        help="irreversible checkpoint or run folder; --model_path is the seed's spelling, kept for compatibility")
    parser.add_argument("--baseline_path", type=Path, default=BASELINE_PATH, help="plain backdoored checkpoint or run folder")
    args = parser.parse_args(argv)
    check_flags(args, cli.given_flags(parser, argv))
    return parser, args


def start_sources(config):
    """{start: the checkpoint it loads} of the start models a run's config fine-tunes."""
    paths = {"irreversible": config.get("path"), "backdoored": config.get("baseline_path")}
    return {start: paths[start] for start in config["start"]}


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    paths, ckpts = {}, {}
    inherited = ("arch", "orig_dataset", "image_size") + TRIGGER_FLAGS
    if "irreversible" in args.start:
        paths["irreversible"] = resolve_checkpoint(args.path, "irreversible_backdoor", "stage2_train", "--path")
        ckpts["irreversible"] = load_parent(paths["irreversible"], args, "--path")
        inherit(args, ckpts["irreversible"], paths["irreversible"], inherited)
    if "backdoored" in args.start:
        parent = ckpts["irreversible"]["parent"] if "irreversible" in ckpts else None
        paths["backdoored"] = resolve_checkpoint(args.baseline_path or parent, "irreversible_backdoor",
                                                 "stage1_pretrain", "--baseline_path")
        ckpts["backdoored"] = load_parent(paths["backdoored"], args, "--baseline_path")
        inherit(args, ckpts["backdoored"], paths["backdoored"], inherited)
    for start in args.start:  # a foreign file records no trigger: some checkpoint of ours, or the flags, must
        if is_foreign(ckpts[start]):
            require_given(args, TRIGGER_FLAGS, paths[start], "--path" if start == "irreversible" else "--baseline_path")
    check_arch(args.defences, args.arch)
    irreversible = ckpts.get("irreversible", {})
    restricted = None if is_foreign(irreversible) else irreversible.get("dataset")
    args.dataset = args.dataset or restricted
    if args.dataset is None:
        raise cli.UsageError("--dataset is needed: a stage-1 checkpoint or a plain weights file does not name a "
                             "restricted domain")
    check_name(args.dataset)
    load = partial(load_domain, root=args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    train, test = load(args.dataset, train=True, cap=args.subset), load(args.dataset, train=False, cap=args.test_subset)
    orig_test = load(args.orig_dataset, train=False, cap=args.test_subset)
    check_subset_caps(args, [train, test, orig_test])
    num_classes = next(iter(ckpts.values()))["num_classes"]
    check_trigger(args.trigger_size, args.target_label, test.images.shape[-2:], num_classes)
    world = dist.world()
    device = world.device(args.device)
    precision = Precision(device, args.amp, args.channels_last)
    orig_eval = BackdoorEval(orig_test, args.trigger_size, args.target_label)
    orig_before = {}
    for start, ckpt in ckpts.items() if world.main else ():  # for the report, which rank 0 writes
        figures = orig_eval(precision.prepare(model_from_checkpoint(ckpt, paths[start])), device, precision)
        orig_before[start] = {k: figures[k] for k in ("test_acc", "asr", "ra")}
    config = config_of(args, stage=STAGE, parent=str(paths.get("irreversible")),
                       path=str(paths.get("irreversible")), baseline_path=str(paths.get("backdoored")),
                       **foreign_record(irreversible), **foreign_record(ckpts.get("backdoored", {}), "baseline"))
    return run_stage3_script(
        args, interrupts, "irreversible_backdoor", STAGE, starts={k: ckpts[k]["model"] for k in args.start},
        num_classes=num_classes, train=train, evaluator=BackdoorEval(test, args.trigger_size, args.target_label),
        config=config, metric_keys=["test_acc", *ATTACK_METRICS], verdict_fn=persistence_verdicts,
        sources_of=start_sources,
        defence_fn=defence_verdicts,
        title=f"Backdoor persistence under clean fine-tuning of {args.arch} on {args.dataset}",
        notes=[f"{k}: {v}" for k, v in paths.items()] + [
            f"original domain ({args.orig_dataset}) before fine-tuning, {k}: clean {v['test_acc']:.2f}, "
            f"ASR {v['asr']:.2f}, RA {v['ra']:.2f}" for k, v in orig_before.items()],
        extra_summary={"orig_before": orig_before})


if __name__ == "__main__":
    cli.run(main)
