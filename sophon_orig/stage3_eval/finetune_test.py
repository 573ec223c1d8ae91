"""SOPHON stage 3: fine-tune the sophon, normal and scratch models on the restricted domain and compare.

    python sophon_orig/stage3_eval/finetune_test.py --start sophon --path path_to_ckpt
    python sophon_orig/stage3_eval/finetune_test.py --path seed=runs/A,diverse=runs/B --train_fractions 1.0,0.1 \
        --schedules constant,cosine   # two protected models side by side, same attacks and baselines
    python sophon_orig/stage3_eval/finetune_test.py --path runs/A --renormalize   # attacker undoes a weight rescale
    python sophon_orig/stage3_eval/finetune_test.py --path runs/A --start sophon,normal,scratch,null   # + noise floor
    python sophon_orig/stage3_eval/finetune_test.py --strategies direct_all,initfc_all --optimizers momentum,adam \
        --lrs 1e-4,1e-3 --seeds 0,1
    torchrun --nproc_per_node 2 sophon_orig/stage3_eval/finetune_test.py --seeds 0,1,2,3   # cells over 2 GPUs
    python sophon_orig/stage3_eval/finetune_test.py --path runs/A --suite tuned   # the tuned attacker (see --help)
    python sophon_orig/stage3_eval/finetune_test.py --suite tuned --path my_model.safetensors --arch resnet18 \
        --orig_dataset FashionMNIST --dataset MNIST --start sophon,scratch,null   # a protection made elsewhere
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common import cli
from common.cli import CommonSettings, RestrictedSettings, SpeedSettings
from common.checkpoints import foreign_record
from common.models import renormalized
from common.procedures import check_flags, grid_settings
from common.runs import begin, canonical_path, config_of
from common.settings import Settings, compose, given_flags, parse, setting
from common.stage3 import (NULL_SEED_OFFSET, NULL_START, choose_dataset, labelled_paths, load_starts,
                           restricted_data, run_stage3_script)
from common.sweep import HELDOUT_KEY
from common.train import AccuracyEval
from common.tuned import SuiteSettings, TunedSuite, apply_suite
from common.verdicts import robustness_summary, scratch_verdicts

PROJECT = "sophon_orig"
STAGE = "sophon_orig/stage3_eval"
MODEL_PATH = None  # sophon checkpoint (.pt or run folder); None: newest under runs/sophon_orig/stage2_train
NORMAL_PATH = None  # normal checkpoint; None: the sophon checkpoint's parent, else the newest stage-1 run
STARTS = ("sophon", "normal", "scratch")  # "sophon": every protected model of --path
OPTIONAL_STARTS = (NULL_START,)  # a second scratch model, judged like a protected one: the grid's noise floor
BASELINES = ("normal", "scratch")
INHERITED = ("arch", "orig_dataset", "image_size")  # flags left unset take the (first) protected model's
SHARED = ("arch", "num_classes", "orig_dataset", "image_size", "dataset")  # what the protected models must share
EPOCHS = 20
FINETUNE_LR = 1e-4
BS = 200
SEED = 0


@dataclass
class Models(Settings):
    path: Optional[Path] = setting(MODEL_PATH, "protected checkpoint or run folder, or a comma list of them to compare "
                                               "side by side, each `label=path` or `path` (label: the run folder's "
                                               "name); one unlabelled path is the start 'sophon'; --model_path is the "
                                               "seed's spelling, kept for compatibility", type=Path,
                                   aliases=("model_path",))
    normal_path: Optional[Path] = setting(NORMAL_PATH, "normal (stage-1) checkpoint or run folder", type=Path)
    renormalize: bool = setting(False, "an informed attacker: before fine-tuning, bring every BatchNorm-fed layer of "
                                       "each protected model to a fresh model's weight scale, its function unchanged "
                                       "(the baselines are left as they are, so their cells can be reused)",
                                action="store_true")


def parse_args(argv=None):
    settings = compose("Settings", CommonSettings, RestrictedSettings, grid_settings(STARTS, OPTIONAL_STARTS),
                       SuiteSettings, Models, SpeedSettings)
    parser, args = parse(settings, argv, __doc__, globals())
    given = given_flags(parser, argv)
    check_flags(args, given)
    apply_suite(args, given, STARTS + OPTIONAL_STARTS)
    items = protected_items(args.path)
    if len(items) > 1 or items[0][0] != "sophon":  # recorded (and compared on --resume) as label=/absolute/path,...
        args.path = Path(",".join(f"{label}={canonical_path(path)}" for label, path in items))
    return parser, args


def protected_items(path):
    """--path -> [(label, path)]; a single unlabelled path (or none: the newest stage-2 run) is 'sophon'."""
    return labelled_paths(path, "sophon", BASELINES + OPTIONAL_STARTS)


def start_sources(config):
    """{start: the checkpoint it loads} of the start models a run's config fine-tunes; scratch loads none. A
    protected model renormalised first (--renormalize) is another start than the checkpoint as it is."""
    started = config["start"]
    how = " renormalized" if config.get("renormalize") else ""
    sources = {label: str(path) + how for label, path in protected_items(config["path"])} if "sophon" in started else {}
    return {**sources, **({"normal": config.get("normal_path")} if "normal" in started else {}),
            **({"scratch": None} if "scratch" in started else {}),
            **({NULL_START: f"fresh init, seed + {NULL_SEED_OFFSET}"} if NULL_START in started else {})}


def judged_models(args, judged):
    """The models the robustness summary and the tuned suite judge against scratch: the protected ones, normal (the
    positive control: its head start is what a verdict must detect), null (what a model without protection
    scores)."""
    return [label for label in judged if label != NULL_START] + ["normal"] * ("normal" in args.start) + \
        [NULL_START] * (NULL_START in judged)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    protected = load_starts(args, PROJECT, "stage2_train", protected_items(args.path), "--path", INHERITED, SHARED)
    labels, first = list(protected), next(iter(protected.values()))
    choose_dataset(args, protected)
    normal = load_starts(args, PROJECT, "stage1_pretrain", [("normal", args.normal_path or first.ckpt["parent"])],
                         "--normal_path", shared=("arch", "num_classes"), like=first) if "normal" in args.start else {}
    train, test = restricted_data(args)
    models = {**{label: s.ckpt["model"] for label, s in {**protected, **normal}.items()}, "scratch": None,
              NULL_START: None}
    for label in labels if args.renormalize else ():
        models[label] = renormalized(models[label], args.arch, first.ckpt["num_classes"], args.image_size or 224)
    normal_path = normal["normal"].path if normal else None
    config = config_of(args, stage=STAGE, parent=str(first.path), normal_path=normal_path and str(normal_path),
                       path=",".join(f"{k}={s.path}" for k, s in protected.items()) if labels != ["sophon"]
                       else str(first.path), **foreign_record(first.ckpt),
                       **(foreign_record(normal["normal"].ckpt, "normal") if normal else {}))
    judged = (labels if "sophon" in args.start else []) + ([NULL_START] if NULL_START in args.start else [])
    compare = bool(judged) and "scratch" in args.start and not args.suite  # the suite compares at tuned lrs
    return run_stage3_script(
        args, interrupts, PROJECT, STAGE, num_classes=first.ckpt["num_classes"], train=train,
        starts={k: models[k] for start in args.start for k in (labels if start == "sophon" else [start])},
        evaluator=AccuracyEval(test), config=config, metric_keys=["test_acc"] + [HELDOUT_KEY] * bool(args.suite),
        sources_of=start_sources, suite=TunedSuite(args, judged_models(args, judged), "scratch", NULL_START)
        if args.suite else None,
        verdict_fn=lambda results: [v for label in judged if compare
                                    for v in scratch_verdicts(results, protected=label)],
        robustness_fn=(lambda results: {label: robustness_summary(results, protected=label)
                                        for label in judged_models(args, judged)})
        if compare else None,
        title=f"Fine-tuning {args.arch} on {args.dataset}: {' vs '.join(labels)} vs normal vs scratch",
        notes=[f"{label}: {s.path}" for label, s in protected.items()] + [f"normal: {normal_path}",
                                                                         f"test samples: {len(test)}"])


if __name__ == "__main__":
    cli.run(main)
