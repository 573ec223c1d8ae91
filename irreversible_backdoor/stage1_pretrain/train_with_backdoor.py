"""Irreversible-backdoor stage 1: BadNets pretraining on the original domain.

    python irreversible_backdoor/stage1_pretrain/train_with_backdoor.py
    python irreversible_backdoor/stage1_pretrain/train_with_backdoor.py --orig_dataset FashionMNIST \
        --image_size 32 --init scratch --trigger_size 3
"""
from functools import partial

from common import cli
from common.backdoor import BackdoorEval, check_trigger, poison, trigger_flags
from common.data import check_name, check_subset_caps, load_domain
from common.models import build_model
from common.runs import Interrupts, close_run, config_of, guarded, open_run, preflight_resume
from common.stage1 import run_stage1
from common.train import Precision, resolve_device, seed_everything

STAGE = "irreversible_backdoor/stage1_pretrain"
ARCH = "resnet18"  # resnet18 | resnet34 | resnet50 | caformer
ORIG_DATASET = "ImageNette"  # the task the model keeps, poisoned here
IMAGE_SIZE = None  # None: the seed's 224 crop for ImageNette; 32 for CPU-scale runs
POISON_PERCENT = 0.1  # share of training samples stamped and relabelled
TARGET_LABEL = 0
TRIGGER_SIZE = 5  # white square, bottom-right, px of the final image
EPOCHS = 20
LR = 1e-3  # Adam
BS = 64
INIT = "imagenet"  # imagenet | scratch
SEED = 0
SAVE_EVERY = 1


def parse_args(argv=None):
    parser = cli.build_parser(__doc__, [
        cli.common_flags(arch=ARCH, orig_dataset=ORIG_DATASET, bs=BS, seed=SEED, image_size=IMAGE_SIZE),
        trigger_flags(poison_percent=POISON_PERCENT, target_label=TARGET_LABEL, trigger_size=TRIGGER_SIZE),
        cli.speed_flags()])
    parser.add_argument("--epochs", type=cli.pos_int, default=EPOCHS)
    parser.add_argument("--lr", type=cli.pos_float, default=LR)
    parser.add_argument("--init", choices=("imagenet", "scratch"), default=INIT)
    parser.add_argument("--save_every", type=cli.pos_int, default=SAVE_EVERY)
    return parser, parser.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    interrupts = Interrupts()
    if preflight_resume(parser, args, STAGE):
        return 0
    check_name(args.orig_dataset)
    load = partial(load_domain, args.orig_dataset, args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    clean_train, test = load(train=True, cap=args.subset), load(train=False, cap=args.test_subset)
    check_subset_caps(args, [clean_train, test])
    check_trigger(args.trigger_size, args.target_label, clean_train.images.shape[-2:], clean_train.num_classes)
    train, poisoned = poison(clean_train, args.poison_percent, args.target_label, args.trigger_size)
    device = resolve_device(args.device)
    precision = Precision(device, args.amp, args.channels_last, args.compile)
    seed_everything(args.seed)
    model = precision.prepare(build_model(args.arch, train.num_classes, args.init))
    config = config_of(args, stage=STAGE, dataset=None, parent=None)
    run = open_run(args, "irreversible_backdoor", "stage1_pretrain", args.orig_dataset, config)
    run.log_note(f"{len(poisoned)} of {len(train)} training samples poisoned towards class {args.target_label}")
    meta = dict(arch=args.arch, dataset=args.orig_dataset, stage=STAGE, parent=None, config=config)
    evaluate = partial(BackdoorEval(test, args.trigger_size, args.target_label), device=device, precision=precision)

    def body():
        summary = run_stage1(args, run, model, train, evaluate, device, precision, interrupts, meta,
                             resume=args.resume is not None)
        if summary is None:
            return 130
        close_run(run, STAGE, {"arch": args.arch, "orig_dataset": args.orig_dataset, **summary}, len(test),
                  run.ckpt_dir / "final.pt")
        return 0

    return guarded(run, STAGE, body)


if __name__ == "__main__":
    cli.run(main)
