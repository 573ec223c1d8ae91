"""SOPHON stage 1: train the normal model on the original domain.

    python sophon_orig/stage1_pretrain/train.py                      # ImageNette, resnet18, ImageNet init
    python sophon_orig/stage1_pretrain/train.py --orig_dataset FashionMNIST --image_size 32 --init scratch
"""
from common import cli
from common.runs import begin
from common.settings import parse
from common.stage1 import run_stage1_script, stage1_settings

STAGE = "sophon_orig/stage1_pretrain"
# The seed's constants: editing one and passing its flag are the same thing (a constant named like a setting
# overrides that setting's default; python train.py --help lists every setting with its default).
ARCH = "resnet18"  # resnet18 | resnet34 | resnet50 | caformer
ORIG_DATASET = "ImageNette"  # the task the model must keep
IMAGE_SIZE = None  # None: the seed's 224 crop for ImageNette; 32 for CPU-scale runs
EPOCHS = 2
LR = 1e-3  # Adam
BS = 64
INIT = "imagenet"  # imagenet | scratch | a weights file
SEED = 0
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
