"""SOPHON stage 1: train the normal model on the original domain.

    python sophon_orig/stage1_pretrain/train.py                      # ImageNette, resnet18, ImageNet init
    python sophon_orig/stage1_pretrain/train.py --orig_dataset FashionMNIST --image_size 32 --init scratch
"""
from common import cli
from common.runs import begin
from common.settings import parse
from common.stage1 import run_stage1_script, stage1_settings

STAGE = "sophon_orig/stage1_pretrain"
# The seed's defaults are common.stage1's (python train.py --help lists every setting with its default);
# an UPPER_CASE constant here named like a setting (EPOCHS = 5) would override it.
Settings = stage1_settings()


def parse_args(argv=None):
    return parse(Settings, argv, __doc__, globals())


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv)
    if args is None:
        return 0
    return run_stage1_script(args, interrupts, "sophon_orig", STAGE)


if __name__ == "__main__":
    cli.run(main)
