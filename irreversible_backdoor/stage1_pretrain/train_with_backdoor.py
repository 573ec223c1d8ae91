"""Irreversible-backdoor stage 1: BadNets pretraining on the original domain.

    python irreversible_backdoor/stage1_pretrain/train_with_backdoor.py
    python irreversible_backdoor/stage1_pretrain/train_with_backdoor.py --orig_dataset FashionMNIST \
        --image_size 32 --init scratch --trigger_size 3
"""
from common import cli
from common.backdoor import BackdoorEval, check_trigger, poison, trigger_flags
from common.runs import begin
from common.stage1 import run_stage1_script, stage1_flags

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
SAM_RHO = 0.0  # > 0: sharpness-aware training (SBL's flat backdoor; README, "Irreversible backdoor")
SEED = 0
SAVE_EVERY = 1


def parse_args(argv=None):
    parser = cli.build_parser(__doc__, [
        cli.common_flags(arch=ARCH, orig_dataset=ORIG_DATASET, bs=BS, seed=SEED, image_size=IMAGE_SIZE),
        trigger_flags(poison_percent=POISON_PERCENT, target_label=TARGET_LABEL, trigger_size=TRIGGER_SIZE),
        stage1_flags(epochs=EPOCHS, lr=LR, init=INIT, save_every=SAVE_EVERY, sam_rho=SAM_RHO), cli.speed_flags()])
    return parser, parser.parse_args(argv)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv)
    if args is None:
        return 0

    def make_train(clean):
        check_trigger(args.trigger_size, args.target_label, clean.images.shape[-2:], clean.num_classes)
        poisoned, chosen = poison(clean, args.poison_percent, args.target_label, args.trigger_size)
        return poisoned, f"{len(chosen)} of {len(clean)} training samples poisoned towards class {args.target_label}"

    return run_stage1_script(args, interrupts, "irreversible_backdoor", STAGE, make_train,
                             lambda test: BackdoorEval(test, args.trigger_size, args.target_label))


if __name__ == "__main__":
    cli.run(main)
