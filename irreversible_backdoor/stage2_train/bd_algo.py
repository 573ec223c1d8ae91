"""Irreversible-backdoor stage 2: train the backdoor to survive clean fine-tuning on the restricted domain.

FTS simulates clean fine-tuning on the restricted domain; its query loss is CE towards the target label on
the same query images with the trigger stamped. NTR trains on the poisoned original domain.

    python irreversible_backdoor/stage2_train/bd_algo.py --alpha 3 --beta 5 --dataset CIFAR10 --arch resnet18
"""
from functools import partial

from common import cli
from common.backdoor import BackdoorEval, check_trigger, poison, target_query_loss, trigger_flags
from common.runs import begin
from common.stage2 import Stage2Task, run_stage2_script, setup_stage2, stage2_flags

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
FTS_OPTIMIZERS = "momentum"
FTS_LRS = "1e-3,1e-2"
FTS_HEAD = "keep"


def parse_args(argv=None):
    common = cli.common_flags(arch=None, orig_dataset=None, bs=BS, seed=SEED, inherit=True)
    parser = cli.build_parser(__doc__, [common, cli.restricted_flag(DATASET), stage2_flags(globals(), FTS_HEAD),
                                        trigger_flags(), cli.speed_flags()])
    parser.set_defaults(fts_optimizers=FTS_OPTIMIZERS.split(","), fts_lrs=[float(v) for v in FTS_LRS.split(",")])
    return parser, parser.parse_args(argv)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv)
    if args is None:
        return 0
    s = setup_stage2(args, "irreversible_backdoor", STAGE,
                     ("arch", "orig_dataset", "image_size", "trigger_size", "target_label", "poison_percent"))
    check_trigger(args.trigger_size, args.target_label, s.restr_train.images.shape[-2:], s.restr_train.num_classes)
    ntr_train, _ = poison(s.orig_train, args.poison_percent, args.target_label, args.trigger_size)
    ntr_train.pin_for(s.device)
    bind = dict(device=s.device, precision=s.precision)
    task = Stage2Task(
        query_loss=target_query_loss(s.restr_train, args.trigger_size, args.target_label, s.device,
                                     s.precision.channels_last),
        restricted_train=s.restr_train, ntr_train=ntr_train, loss_type="target_ce", extra_columns=["orig_asr"],
        eval_orig=partial(BackdoorEval(s.orig_test, args.trigger_size, args.target_label, prefix="orig_"), **bind),
        eval_restricted=partial(BackdoorEval(s.restr_test, args.trigger_size, args.target_label), **bind))
    return run_stage2_script(args, interrupts, "irreversible_backdoor", STAGE, s, task)


if __name__ == "__main__":
    cli.run(main)
