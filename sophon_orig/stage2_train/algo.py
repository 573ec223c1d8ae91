"""SOPHON stage 2: make the normal model resist fine-tuning on the restricted domain (FTS + NTR).

    python sophon_orig/stage2_train/algo.py --alpha 3 --beta 5 --dataset CIFAR10 --arch resnet18
    python sophon_orig/stage2_train/algo.py --loss_type kl --model_path runs/sophon_orig/stage1_pretrain/<run>
    python sophon_orig/stage2_train/algo.py --preset robust --dataset MNIST      # long, scale-free simulated attackers
    python sophon_orig/stage2_train/algo.py --preset box --dataset MNIST         # the worst case in Adam's reach
    python sophon_orig/stage2_train/algo.py --preset tar --dataset MNIST         # TAR's recipe, for comparison
    torchrun --nproc_per_node 4 sophon_orig/stage2_train/algo.py --fts_envs 4 ...   # environments over 4 GPUs
"""
from dataclasses import dataclass
from functools import partial

from common import cli
from common.losses import FTE_LOSSES, fte_query_loss
from common.runs import begin
from common.settings import Settings, parse, setting
from common.stage2 import SUPERSEDES, Stage2Task, run_stage2_script, setup_stage2, stage2_settings
from common.train import AccuracyEval

STAGE = "sophon_orig/stage2_train"
# The seed's constants: editing one and passing its flag are the same thing (a constant named like a setting
# overrides that setting's default; python algo.py --help lists every setting with its default).
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
SEED = 0
# Named configurations (--preset NAME): flag values as typed; flags on the command line still win.
# robust: long, scale-free simulated attackers (README, "Protection against adaptive attackers").
# box: the worst case of the L-infinity box an Adam attacker reaches in place of FTS (common/box.py); beside the robust
# preset's attackers: --preset robust --box_loop 1.
# tar: TAR's recipe (Tamirisa et al. ICLR'25; rishub-tamirisa/tamper-resistance, run_tar_bio.sh and tar_training_loop)
# at our scale. From there: entropy = max_entropy; 64 AdamW inner steps = tar_inner_loop_steps 64 with
# torch.optim.AdamW; query every 4th = tar_inner_loop_subsample 4; exp weights at rate 4 = use_weighting_schedule,
# schedule_lambda 0.0625 x 64 steps; a third of the episodes retain-then-forget = retain_forget_switch:0.33 of three
# adversaries, their switch M = int(64 Beta(6, 3)) (switching_point_coeffs) at its 10, 30, 50, 70, 90% quantiles;
# ntr_rep_weight 1 = retain_representations (CE + feature distance, weight 1); alpha 4, beta 1 = lambda_TR 4
# (tar_tamper_resistance_grad_scale), lambda_retain 1 (tar_retain_scale) as step sizes: TAR sums both gradients into
# one AdamW, where the weights set their shares of one step; our FTS and NTR each step their own Adam, which a
# loss weight cannot change; 750 loops = max_steps 750. Not reproduced: TAR's schedule-free outer AdamW and its 32
# warm-up steps (our outer Adam is constant). Changed for images: lrs 1e-3,1e-2,2e-2 = TAR's 2e-6,2e-5,4e-5 (0.1,
# 1, 2 x its attackers' lr) around 1e-2, the AdamW lr our tuned attacker picks; heads reinit and keep (an LLM
# keeps its one head; an image attacker may bring a new one); lr 1e-4, bs 150, 32 px and fts_clip stay ours.
PRESETS = {"robust": {"loss_type": "entropy", "adaptation_steps": 20, "fts_query_every": 2, "fts_step_weights": "exp",
                      "fts_optimizers": "momentum,adam,adamw,rmsprop,sign", "fts_lr_range": "1e-5,1e-3",
                      "fts_schedules": "constant,cosine,warmup_cosine", "fts_head": "reinit,keep"},
           "box": {"loss_type": "entropy", "fts_loop": 0, "box_loop": 1},
           "tar": {"loss_type": "entropy", "adaptation_steps": 64, "fts_optimizers": "adamw",
                   "fts_lrs": "1e-3,1e-2,2e-2", "fts_head": "reinit,keep", "fts_query_every": 4,
                   "fts_step_weights": "exp", "fts_exp_rate": 4.0, "fts_retain_steps": "29,37,43,48,54",
                   "fts_retain_share": 0.33, "ntr_rep_weight": 1.0, "alpha": 4.0, "beta": 1.0, "total_loop": 750}}


@dataclass
class QueryLoss(Settings):
    loss_type: str = setting("inverse", "the FTS query loss: inverse (paper), inverse_code (official code), kl, "
                                        "entropy (TAR)", choices=FTE_LOSSES)


def parse_args(argv=None):
    # composed when parsing, so a method registered at run time brings its flags (common.methods)
    return parse(stage2_settings(QueryLoss), argv, __doc__, globals(), PRESETS, SUPERSEDES)


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
