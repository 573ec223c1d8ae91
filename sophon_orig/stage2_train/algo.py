"""SOPHON stage 2: make the normal model resist fine-tuning on the restricted domain (FTS + NTR).

    python sophon_orig/stage2_train/algo.py --alpha 3 --beta 5 --dataset CIFAR10 --arch resnet18
    python sophon_orig/stage2_train/algo.py --loss_type kl --model_path runs/sophon_orig/stage1_pretrain/<run>
"""
from functools import partial

from common import cli
from common.checkpoints import inherit, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from common.data import check_name, check_subset_caps, load_domain
from common.losses import FTE_LOSSES
from common.runs import Interrupts, close_run, config_of, guarded, open_run, preflight_resume
from common.stage2 import Stage2, Stage2Task, stage2_flags
from common.train import AccuracyEval, Precision, resolve_device, seed_everything

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
    parser, args = parse_args(argv)
    interrupts = Interrupts()
    if preflight_resume(parser, args, STAGE):
        return 0
    parent = resolve_checkpoint(args.model_path, "sophon_orig", "stage1_pretrain")
    ckpt = load_checkpoint(parent)
    inherit(args, ckpt, parent, ("arch", "orig_dataset", "image_size"))
    check_name(args.dataset)
    if args.dataset == args.orig_dataset:
        raise cli.UsageError(f"restricted --dataset {args.dataset} equals the original domain; choose another")
    load = partial(load_domain, root=args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    orig_train, orig_test = load(args.orig_dataset, train=True, cap=args.subset), load(args.orig_dataset, train=False, cap=args.test_subset)
    restr_train, restr_test = load(args.dataset, train=True, cap=args.subset), load(args.dataset, train=False, cap=args.test_subset)
    check_subset_caps(args, [orig_train, orig_test, restr_train, restr_test])
    device = resolve_device(args.device)
    precision = Precision(device, args.amp, args.channels_last, args.compile)
    seed_everything(args.seed)
    model = precision.prepare(model_from_checkpoint(ckpt, parent))
    config = config_of(args, stage=STAGE, parent=str(parent), model_path=str(parent))
    run = open_run(args, "sophon_orig", "stage2_train", args.dataset, config)
    for d in (orig_train, restr_train):
        if d.note:
            run.log_note(d.note)
    fte = FTE_LOSSES[args.loss_type]
    task = Stage2Task(
        query_loss=lambda net, x, y: fte(net(restr_train.to_input(x, device, None, precision.channels_last)),
                                         y.to(device, non_blocking=True)),
        restricted_train=restr_train, ntr_train=orig_train, loss_type=args.loss_type,
        eval_orig=partial(AccuracyEval(orig_test, key="orig_test_acc"), device=device, precision=precision),
        eval_restricted=partial(AccuracyEval(restr_test), device=device, precision=precision))
    meta = dict(arch=args.arch, dataset=args.dataset, stage=STAGE, parent=parent, config=config)
    stage2 = Stage2(args, run, model, task, device, precision, meta)

    def body():
        if args.resume is not None and (run.ckpt_dir / "last.pt").exists():
            stage2.load_last()
        summary = stage2.train(interrupts)
        if summary == 130:
            return 130
        close_run(run, STAGE, summary, len(restr_test), run.ckpt_dir / "final.pt")
        return 0

    return guarded(run, STAGE, body)


if __name__ == "__main__":
    cli.run(main)
