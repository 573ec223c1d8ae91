"""SOPHON stage 3: fine-tune the sophon, normal and scratch models on the restricted domain and compare.

    python sophon_orig/stage3_eval/finetune_test.py --start sophon --path path_to_ckpt
    python sophon_orig/stage3_eval/finetune_test.py --strategies direct_all,initfc_all --optimizers momentum,adam \
        --lrs 1e-4,1e-3 --seeds 0,1
    torchrun --nproc_per_node 2 sophon_orig/stage3_eval/finetune_test.py --seeds 0,1,2,3   # cells over 2 GPUs
"""
from functools import partial
from pathlib import Path

from common import cli
from common.checkpoints import foreign_record, inherit, is_foreign, load_parent, resolve_checkpoint
from common.data import check_name, check_subset_caps, load_domain
from common.finetune import grid_flags
from common.runs import begin, config_of
from common.stage3 import run_stage3_script
from common.train import AccuracyEval
from common.verdicts import scratch_verdicts

STAGE = "sophon_orig/stage3_eval"
MODEL_PATH = None  # sophon checkpoint (.pt or run folder); None: newest under runs/sophon_orig/stage2_train
NORMAL_PATH = None  # normal checkpoint; None: the sophon checkpoint's parent, else the newest stage-1 run
STARTS = ("sophon", "normal", "scratch")
EPOCHS = 20
FINETUNE_LR = 1e-4
BS = 200
SEED = 0


def parse_args(argv=None):
    common = cli.common_flags(arch=None, orig_dataset=None, bs=BS, seed=SEED, inherit=True)
    parser = cli.build_parser(__doc__, [common, cli.restricted_flag(None), grid_flags(EPOCHS, FINETUNE_LR, BS, STARTS),
                                        cli.speed_flags()])
    parser.add_argument("--path", "--model_path", dest="path", type=Path, default=MODEL_PATH,
                        help="sophon checkpoint or run folder; --model_path is the seed's spelling, kept for compatibility")
    parser.add_argument("--normal_path", type=Path, default=NORMAL_PATH, help="normal (stage-1) checkpoint or run folder")
    return parser, parser.parse_args(argv)


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    sophon_path = resolve_checkpoint(args.path, "sophon_orig", "stage2_train", "--path")
    sophon = load_parent(sophon_path, args, "--path")
    inherit(args, sophon, sophon_path, ("arch", "orig_dataset", "image_size"))
    if is_foreign(sophon) and args.dataset is None:
        raise cli.UsageError(f"--path {sophon_path} is a plain weights file, which does not name the restricted "
                             f"domain: give --dataset")
    args.dataset = args.dataset or sophon["dataset"]
    check_name(args.dataset)
    starts = {"sophon": sophon["model"], "scratch": None}
    normal_path = None
    if "normal" in args.start:
        normal_path = resolve_checkpoint(args.normal_path or sophon["parent"], "sophon_orig", "stage1_pretrain", "--normal_path")
        normal = load_parent(normal_path, args, "--normal_path")
        if normal["arch"] != args.arch or normal["num_classes"] != sophon["num_classes"]:
            raise cli.UsageError(f"--normal_path {normal_path} is a {normal['arch']} with {normal['num_classes']} "
                                 f"classes; the sophon model is a {args.arch} with {sophon['num_classes']}")
        starts["normal"] = normal["model"]
    load = partial(load_domain, args.dataset, args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    train, test = load(train=True, cap=args.subset), load(train=False, cap=args.test_subset)
    check_subset_caps(args, [train, test])
    config = config_of(args, stage=STAGE, parent=str(sophon_path), path=str(sophon_path),
                       normal_path=str(normal_path) if normal_path else None, **foreign_record(sophon),
                       **(foreign_record(normal, "normal") if normal_path else {}))
    verdict_fn = scratch_verdicts if {"sophon", "scratch"} <= set(args.start) else (lambda results: [])
    return run_stage3_script(
        args, interrupts, "sophon_orig", STAGE, starts={k: starts[k] for k in args.start},
        num_classes=sophon["num_classes"], train=train, evaluator=AccuracyEval(test), config=config,
        metric_keys=["test_acc"], verdict_fn=verdict_fn,
        title=f"Fine-tuning {args.arch} on {args.dataset}: sophon vs normal vs scratch",
        notes=[f"sophon: {sophon_path}", f"normal: {normal_path}", f"test samples: {len(test)}"])


if __name__ == "__main__":
    cli.run(main)
