"""SOPHON stage 1: train the normal model on the original domain.

    python sophon_orig/stage1_pretrain/train.py                      # ImageNette, resnet18, ImageNet init
    python sophon_orig/stage1_pretrain/train.py --orig_dataset FashionMNIST --image_size 32 --init scratch
"""
from common import cli
from common.runs import begin
from common.stage1 import run_stage1_script, stage1_flags

STAGE = "sophon_orig/stage1_pretrain"
ARCH = "resnet18"  # resnet18 | resnet34 | resnet50 | caformer
ORIG_DATASET = "ImageNette"  # the task the model must keep
IMAGE_SIZE = None  # None: the seed's 224 crop for ImageNette; 32 for CPU-scale runs
EPOCHS = 2
LR = 1e-3  # Adam
BS = 64
INIT = "imagenet"  # imagenet | scratch
SAM_RHO = 0.0  # > 0: sharpness-aware training steps of this radius
SEED = 0
SAVE_EVERY = 1  # write checkpoints/last.pt every N epochs


def parse_args(argv=None):
    parser = cli.build_parser(__doc__, [
        cli.common_flags(arch=ARCH, orig_dataset=ORIG_DATASET, bs=BS, seed=SEED, image_size=IMAGE_SIZE),
        stage1_flags(epochs=EPOCHS, lr=LR, init=INIT, save_every=SAVE_EVERY, sam_rho=SAM_RHO), cli.speed_flags()])
    return parser, parser.parse_args(argv)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv)
    if args is None:
        return 0
    return run_stage1_script(args, interrupts, "sophon_orig", STAGE)

if __name__ == "__main__":
    cli.run(main)
