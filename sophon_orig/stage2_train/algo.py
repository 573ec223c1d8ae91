"""SOPHON stage 2: make the normal model resist fine-tuning on the restricted domain (FTS + NTR).

    python sophon_orig/stage2_train/algo.py --alpha 3 --beta 5 --dataset CIFAR10 --arch resnet18
    python sophon_orig/stage2_train/algo.py --loss_type kl --model_path runs/sophon_orig/stage1_pretrain/<run>
    python sophon_orig/stage2_train/algo.py --preset robust --dataset MNIST      # long, scale-free simulated attackers
    torchrun --nproc_per_node 4 sophon_orig/stage2_train/algo.py --fts_envs 4 ...   # environments over 4 GPUs
"""
from functools import partial

from common import cli
from common.losses import FTE_LOSSES, fte_query_loss
from common.runs import begin
from common.stage2 import SUPERSEDES, Stage2Task, run_stage2_script, setup_stage2, stage2_flags
from common.train import AccuracyEval

STAGE = "sophon_orig/stage2_train"
MODEL_PATH = None  # stage-1 checkpoint (.pt or run folder); None: newest under runs/sophon_orig/stage1_pretrain
DATASET = "CIFAR10"  # restricted domain
LOSS_TYPE = "inverse"  # inverse (paper) | inverse_code (official code) | kl | entropy (TAR)
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
# The simulated fine-tuner, sampled per episode from these comma lists (the seed's: SGD at FAST_LR, new head)
FTS_OPTIMIZERS = "sgd"  # sgd | momentum | adam | adamw | rmsprop
FTS_LRS = None  # None: FAST_LR
FTS_HEAD = "reinit"  # reinit | keep
FTS_SCOPE = "all"  # all | head
FTS_ENVS = 1  # simulated fine-tuners per FTS step
FTS_CLIP = 0.5  # max norm of the FTS gradient (the official code's value)
FTS_SCHEDULES = "constant"  # lr schedule inside an episode: constant | cosine | warmup_cosine
FTS_LR_RANGE = None  # "LO,HI": each episode's lr drawn log-uniformly from it instead of FTS_LRS
FTS_LR_ADAPT = 0.0  # > 0: the lr is learned by the simulated attacker inside FTS_LR_RANGE (MLAC), step in log lr
FTS_LR_LEARNED_SHARE = 1.0  # with FTS_LR_ADAPT: share of episodes at the learned lr, the rest drawn from the range
FTS_QUERY_EVERY = 1  # query loss after every N-th inner step (and the last)
FTS_STEP_WEIGHTS = "uniform"  # uniform | exp (late inner steps weigh more)
RESCALE = None  # e.g. 10: BatchNorm-fed layers x10 before stage 2, same function (README, "A rescaled start")
RESCALE_OUTER_LR = False  # True: stage 2's own optimisers step the rescaled layers at RESCALE x the lr
# Named configurations (--preset NAME): flag values as typed; flags on the command line still win.
# robust: long, scale-free simulated attackers (README, "Protection against adaptive attackers").
PRESETS = {"robust": {"loss_type": "entropy", "adaptation_steps": 20, "fts_query_every": 2, "fts_step_weights": "exp",
                      "fts_optimizers": "momentum,adam,adamw,rmsprop,sign", "fts_lr_range": "1e-5,1e-3",
                      "fts_schedules": "constant,cosine,warmup_cosine", "fts_head": "reinit,keep"}}


def parse_args(argv=None):
    common = cli.common_flags(arch=None, orig_dataset=None, bs=BS, seed=SEED, inherit=True)
    stage2 = stage2_flags(
        model_path=MODEL_PATH, alpha=ALPHA, beta=BETA, lr=LR, fast_lr=FAST_LR, fts_loop=FTS_LOOP, ntr_loop=NTR_LOOP,
        total_loop=TOTAL_LOOP, adaptation_steps=ADAPTATION_STEPS, test_interval=TEST_INTERVAL,
        finetune_epochs=FINETUNE_EPOCHS, final_finetune_epochs=FINAL_FINETUNE_EPOCHS, finetune_lr=FINETUNE_LR,
        min_orig_acc=MIN_ORIG_ACC, max_strikes=MAX_STRIKES, eval_interval=EVAL_INTERVAL, save_every=SAVE_EVERY,
        fts_optimizers=FTS_OPTIMIZERS, fts_lrs=FTS_LRS, fts_head=FTS_HEAD, fts_scope=FTS_SCOPE, fts_envs=FTS_ENVS,
        fts_clip=FTS_CLIP, fts_schedules=FTS_SCHEDULES, fts_lr_range=FTS_LR_RANGE, fts_lr_adapt=FTS_LR_ADAPT,
        fts_lr_learned_share=FTS_LR_LEARNED_SHARE, fts_query_every=FTS_QUERY_EVERY, fts_step_weights=FTS_STEP_WEIGHTS,
        rescale=RESCALE, rescale_outer_lr=RESCALE_OUTER_LR)
    parser = cli.build_parser(__doc__, [cli.preset_flag(PRESETS), common, cli.restricted_flag(DATASET), stage2,
                                        cli.speed_flags()])
    parser.add_argument("--loss_type", choices=tuple(FTE_LOSSES), default=LOSS_TYPE)
    return parser, cli.parse_with_presets(parser, argv, PRESETS, SUPERSEDES)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    s = setup_stage2(args, "sophon_orig", STAGE)
    bind = dict(device=s.device, precision=s.precision)
    task = Stage2Task(
        query_loss=fte_query_loss(FTE_LOSSES[args.loss_type], s.restr_train, s.device, s.precision.channels_last),
        restricted_train=s.restr_train, ntr_train=s.orig_train, loss_type=args.loss_type,
        eval_orig=partial(AccuracyEval(s.orig_test, key="orig_test_acc"), **bind),
        eval_restricted=partial(AccuracyEval(s.restr_test), **bind))
    return run_stage2_script(args, interrupts, "sophon_orig", STAGE, s, task)


if __name__ == "__main__":
    cli.run(main)
