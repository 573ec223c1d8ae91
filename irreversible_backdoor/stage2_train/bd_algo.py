"""Irreversible-backdoor stage 2: train the backdoor to survive clean fine-tuning on the restricted domain.

FTS simulates clean fine-tuning on the restricted domain; its query loss is CE towards the target label on
the same query images with the trigger stamped. NTR trains on the poisoned original domain.

    python irreversible_backdoor/stage2_train/bd_algo.py --alpha 3 --beta 5 --dataset CIFAR10 --arch resnet18
    python irreversible_backdoor/stage2_train/bd_algo.py --preset persistent --dataset MNIST    # SBL: survives ft
    torchrun --nproc_per_node 4 irreversible_backdoor/stage2_train/bd_algo.py --fts_envs 4 ...
"""
from functools import partial

from common import cli
from common.backdoor import (ATTACK_METRICS, BackdoorEval, check_trigger, poison, stage2_summary_keys,
                             target_query_loss, trigger_flags)
from common.runs import begin
from common.stage2 import SUPERSEDES, Stage2Task, run_stage2_script, setup_stage2, stage2_flags

STAGE = "irreversible_backdoor/stage2_train"
MODEL_PATH = None  # backdoored stage-1 checkpoint; None: newest under runs/irreversible_backdoor/stage1_pretrain
DATASET = "CIFAR10"  # restricted domain: where clean fine-tuning must not erase the backdoor
ALPHA = 3.0
BETA = 5.0
LR = 1e-4
FAST_LR = 1e-4  # seed's simulated fine-tuner lr (too weak to matter: see README)
BS = 150
FTS_LOOP = 1
NTR_LOOP = 1
TOTAL_LOOP = 300
ADAPTATION_STEPS = 50
TEST_INTERVAL = 25
FINETUNE_EPOCHS = 20
FINAL_FINETUNE_EPOCHS = 20
FINETUNE_LR = 1e-4
MIN_ORIG_ACC = 80.0
MAX_STRIKES = 5
EVAL_INTERVAL = 25
SAVE_EVERY = 50
SEED = 0
# The simulated fine-tuner: the seed's is SGD at FAST_LR with the head kept; measured best for persistence
# is a stronger, momentum fine-tuner (README, "Irreversible backdoor").
FTS_OPTIMIZERS = "momentum"  # sgd | momentum | adam | adamw | rmsprop
FTS_LRS = "1e-3,1e-2"  # None: FAST_LR
FTS_HEAD = "keep"  # a new head has no target class: the query loss would carry no signal
FTS_SCOPE = "all"  # all | head
FTS_ENVS = 1  # simulated fine-tuners per FTS step
FTS_CLIP = 0.5  # max norm of the FTS gradient (the official code's value)
FTS_SCHEDULES = "constant"  # lr schedule inside an episode: constant | cosine | warmup_cosine
FTS_LR_RANGE = None  # "LO,HI": each episode's lr drawn log-uniformly from it instead of FTS_LRS
FTS_LR_ADAPT = 0.0  # > 0: the lr is learned by the simulated attacker inside FTS_LR_RANGE (MLAC), step in log lr
FTS_LR_LEARNED_SHARE = 1.0  # with FTS_LR_ADAPT: share of episodes at the learned lr, the rest drawn from the range
FTS_QUERY_EVERY = 1  # query loss after every N-th inner step (and the last)
FTS_STEP_WEIGHTS = "uniform"  # uniform | exp (late inner steps weigh more)
RESCALE = None  # e.g. 10: BatchNorm-fed layers x10 before stage 2, same function
RESCALE_OUTER_LR = False  # True: stage 2's own optimisers step the rescaled layers at RESCALE x the lr
# What else was tried for persistence (README, "Irreversible backdoor"): SBL's continual learning on clean
# restricted-domain data with sharpness-aware steps, and Neurotoxin's masking of the clean gradient's coordinates.
CLEAN_LOOP = 0  # clean restricted-domain steps per loop (SBL); 0: off
SAM_RHO = 0.0  # > 0: NTR and clean steps sharpness-aware
MASK_SHARE = 0.0  # Neurotoxin: share of coordinates frozen for FTS and NTR; 0: off
MASK_EVERY = 25
RESTRICTED_HOLDOUT = None  # e.g. 0.05: stage 2 never sees the data stage 3's defender gets with --train_fractions 0.05
# Named configurations (--preset NAME): flag values as typed; flags on the command line still win.
# persistent: SBL, no FTS: clean restricted-domain steps with poisoned-NTR replay, both sharpness-aware
# (README, "Irreversible backdoor": the one configuration that keeps its ASR through ft, ft_sam and fine_pruning).
PRESETS = {"persistent": {"fts_loop": 0, "clean_loop": 1, "sam_rho": 0.05}}


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
        clean_loop=CLEAN_LOOP, sam_rho=SAM_RHO,
        mask_share=MASK_SHARE, mask_every=MASK_EVERY, restricted_holdout=RESTRICTED_HOLDOUT, rescale=RESCALE,
        rescale_outer_lr=RESCALE_OUTER_LR)
    parser = cli.build_parser(__doc__, [cli.preset_flag(PRESETS), common, cli.restricted_flag(DATASET), stage2,
                                        trigger_flags(), cli.speed_flags()])
    return parser, cli.parse_with_presets(parser, argv, PRESETS, SUPERSEDES)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    s = setup_stage2(args, "irreversible_backdoor", STAGE,
                     ("arch", "orig_dataset", "image_size", "trigger_size", "target_label", "poison_percent"))
    missing = [f"--{name}" for name in ("trigger_size", "target_label", "poison_percent") if getattr(args, name) is None]
    if missing:
        raise cli.UsageError(f"{s.parent} records no backdoor ({', '.join(missing)}): give those flags, or a "
                             "train_with_backdoor.py checkpoint")
    check_trigger(args.trigger_size, args.target_label, s.restr_train.images.shape[-2:], s.restr_train.num_classes)
    ntr_train, _ = poison(s.orig_train, args.poison_percent, args.target_label, args.trigger_size)
    ntr_train.pin_for(s.device)
    bind = dict(device=s.device, precision=s.precision)
    task = Stage2Task(
        query_loss=target_query_loss(s.restr_train, args.trigger_size, args.target_label, s.device,
                                     s.precision.channels_last),
        restricted_train=s.restr_train, ntr_train=ntr_train, loss_type="target_ce",
        eval_orig=partial(BackdoorEval(s.orig_test, args.trigger_size, args.target_label, prefix="orig_"), **bind),
        eval_restricted=partial(BackdoorEval(s.restr_test, args.trigger_size, args.target_label), **bind),
        metric_columns=("orig_asr",), probe_columns=ATTACK_METRICS, summary_keys=stage2_summary_keys)
    return run_stage2_script(args, interrupts, "irreversible_backdoor", STAGE, s, task)


if __name__ == "__main__":
    cli.run(main)
