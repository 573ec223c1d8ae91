"""Irreversible-backdoor stage 1: BadNets pretraining on the original domain.

    python irreversible_backdoor/stage1_pretrain/train_with_backdoor.py
    python irreversible_backdoor/stage1_pretrain/train_with_backdoor.py --orig_dataset FashionMNIST \
        --image_size 32 --init scratch --trigger_size 3
"""
from common import cli
from common.backdoor import BackdoorEval, TriggerSettings, check_trigger, poison
from common.runs import begin
from common.settings import parse
from common.stage1 import run_stage1_script, stage1_settings

STAGE = "irreversible_backdoor/stage1_pretrain"
# Editing a constant and passing its flag are the same thing: an UPPER_CASE constant named like a setting
# overrides its default (train.py's; python train_with_backdoor.py --help lists every setting with its default).
POISON_PERCENT = 0.1  # share of training samples stamped and relabelled
TARGET_LABEL = 0
TRIGGER_SIZE = 5  # white square, bottom-right, px of the final image
EPOCHS = 20
Settings = stage1_settings(TriggerSettings)


def parse_args(argv=None):
    return parse(Settings, argv, __doc__, globals())


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
