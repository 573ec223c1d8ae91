"""SOPHON stage 2: make the normal model resist fine-tuning on the restricted domain (FTS + NTR).

    python sophon_orig/stage2_train/algo.py --alpha 3 --beta 5 --dataset CIFAR10 --arch resnet18
    python sophon_orig/stage2_train/algo.py --loss_type kl --model_path runs/sophon_orig/stage1_pretrain/<run>
"""
from functools import partial

from common import cli
from common.losses import FTE_LOSSES
from common.runs import begin
from common.stage2 import Stage2Task, run_stage2_script, setup_stage2, stage2_flags
from common.train import AccuracyEval

STAGE = "sophon_orig/stage2_train"
MODEL_PATH = None  # stage-1 checkpoint (.pt or run folder); None: newest under runs/sophon_orig/stage1_pretrain
DATASET = "CIFAR10"  # restricted domain
LOSS_TYPE = "inverse"  # inverse (paper) | inverse_code (official code) | kl
ALPHA = 3.0  # FTS lr = ALPHA * LR
BETA = 5.0  # NTR lr = BETA * LR
LR = 1e-4
FAST_LR = 1e-4  # simulated fine-tuner's lr
BS = 150  # query = BS // 10 of each batch
FTS_LOOP = 1
NTR_LOOP = 1
TOTAL_LOOP = 1000
ADAPTATION_STEPS = 50  # inner steps per simulated fine-tuning
TEST_INTERVAL = 25  # fine-tune test + loop checkpoint every N loops (0: off)
FINETUNE_EPOCHS = 5
FINAL_FINETUNE_EPOCHS = 20
FINETUNE_LR = 1e-4
MIN_ORIG_ACC = 80.0  # original-accuracy floor (%): a breach rolls back to the last passing evaluation
MAX_STRIKES = 5
EVAL_INTERVAL = 25
SAVE_EVERY = 50
SEED = 0


def parse_args(argv=None):
    common = cli.common_flags(arch=None, orig_dataset=None, bs=BS, seed=SEED, inherit=True)
    parser = cli.build_parser(__doc__, [common, cli.restricted_flag(DATASET), stage2_flags(globals(), "reinit"),
                                        cli.speed_flags()])
    parser.add_argument("--loss_type", choices=tuple(FTE_LOSSES), default=LOSS_TYPE)
    return parser, parser.parse_args(argv)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv)
    if args is None:
        return 0
    s = setup_stage2(args, "sophon_orig", STAGE)
    fte, cl = FTE_LOSSES[args.loss_type], s.precision.channels_last
    task = Stage2Task(
        query_loss=lambda net, x, y: fte(net(s.restr_train.to_input(x, s.device, None, cl)), y.to(s.device)),
        restricted_train=s.restr_train, ntr_train=s.orig_train, loss_type=args.loss_type,
        eval_orig=partial(AccuracyEval(s.orig_test, key="orig_test_acc"), device=s.device, precision=s.precision),
        eval_restricted=partial(AccuracyEval(s.restr_test), device=s.device, precision=s.precision))
    return run_stage2_script(args, interrupts, "sophon_orig", STAGE, s, task)


if __name__ == "__main__":
    cli.run(main)
