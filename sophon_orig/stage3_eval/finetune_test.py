"""SOPHON stage 3: fine-tune the sophon, normal and scratch models on the restricted domain and compare.

    python sophon_orig/stage3_eval/finetune_test.py --start sophon --path path_to_ckpt
    python sophon_orig/stage3_eval/finetune_test.py --path seed=runs/A,diverse=runs/B --train_fractions 1.0,0.1 \
        --schedules constant,cosine   # two protected models side by side, same attacks and baselines
    python sophon_orig/stage3_eval/finetune_test.py --path runs/A --renormalize   # attacker undoes a weight rescale
    python sophon_orig/stage3_eval/finetune_test.py --path runs/A --start sophon,normal,scratch,null   # + noise floor
    python sophon_orig/stage3_eval/finetune_test.py --strategies direct_all,initfc_all --optimizers momentum,adam \
        --lrs 1e-4,1e-3 --seeds 0,1
    torchrun --nproc_per_node 2 sophon_orig/stage3_eval/finetune_test.py --seeds 0,1,2,3   # cells over 2 GPUs
"""
from functools import partial
from pathlib import Path

from common import cli
from common.checkpoints import foreign_record, inherit, is_foreign, load_parent, resolve_checkpoint
from common.data import check_name, check_subset_caps, load_domain
from common.models import renormalized
from common.finetune import grid_flags
from common.runs import begin, canonical_path, config_of
from common.stage3 import NULL_SEED_OFFSET, NULL_START, run_stage3_script
from common.train import AccuracyEval
from common.verdicts import robustness_summary, scratch_verdicts

STAGE = "sophon_orig/stage3_eval"
MODEL_PATH = None  # sophon checkpoint (.pt or run folder); None: newest under runs/sophon_orig/stage2_train
NORMAL_PATH = None  # normal checkpoint; None: the sophon checkpoint's parent, else the newest stage-1 run
STARTS = ("sophon", "normal", "scratch")  # "sophon": every protected model of --path
OPTIONAL_STARTS = (NULL_START,)  # a second scratch model, judged like a protected one: the grid's noise floor
BASELINES = ("normal", "scratch")
SHARED = ("arch", "num_classes", "orig_dataset", "image_size", "dataset")  # what the protected models must share
EPOCHS = 20
FINETUNE_LR = 1e-4
BS = 200
SEED = 0


def parse_args(argv=None):
    common = cli.common_flags(arch=None, orig_dataset=None, bs=BS, seed=SEED, inherit=True)
    grid = grid_flags(EPOCHS, FINETUNE_LR, BS, STARTS, OPTIONAL_STARTS)
    parser = cli.build_parser(__doc__, [common, cli.restricted_flag(None), grid, cli.speed_flags()])
    parser.add_argument("--path", "--model_path", dest="path", type=Path, default=MODEL_PATH,
                        help="protected checkpoint or run folder, or a comma list of them to compare side by side, "
                             "each `label=path` or `path` (label: the run folder's name); one unlabelled path "
                             "is the start 'sophon'; --model_path is the seed's spelling, kept for compatibility")
    parser.add_argument("--normal_path", type=Path, default=NORMAL_PATH, help="normal (stage-1) checkpoint or run folder")
    parser.add_argument("--renormalize", action="store_true",
                        help="an informed attacker: before fine-tuning, bring every BatchNorm-fed layer of each "
                             "protected model to a fresh model's weight scale, its function unchanged (the baselines "
                             "are left as they are, so their cells can be reused)")
    args = parser.parse_args(argv)
    items = protected_items(args.path)
    if len(items) > 1 or items[0][0] != "sophon":  # recorded (and compared on --resume) as label=/absolute/path,...
        args.path = Path(",".join(f"{label}={canonical_path(path)}" for label, path in items))
    return parser, args


def _label_of(path):
    path = Path(path).expanduser()
    if path.is_dir():
        return path.resolve().name
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def protected_items(path):
    """--path -> [(label, path)]: comma items `label=path` or `path` (labelled by its run folder's name); a
    single unlabelled path (or none: the newest stage-2 run) is 'sophon'. Labels are unique and are not
    the baselines' names."""
    if path is None:
        return [("sophon", None)]
    items = []
    for raw in str(path).split(","):
        raw = raw.strip()
        if not raw:
            raise cli.UsageError(f"--path {path}: empty item")
        head, sep, tail = raw.partition("=")
        if sep and head and "/" not in head:
            items.append((head, Path(tail)))
        else:
            items.append((None, Path(raw)))
    if len(items) == 1 and items[0][0] is None:
        return [("sophon", items[0][1])]
    items = [(label or _label_of(p), p) for label, p in items]
    seen = {}
    for label, p in items:
        if label in BASELINES + OPTIONAL_STARTS or any(c in label for c in "|,="):
            raise cli.UsageError(f"--path: label {label!r} is reserved or holds one of | , = ; give label=path")
        if label in seen:
            raise cli.UsageError(f"--path: label {label!r} names two models ({seen[label]} and {p}); give "
                                 f"unique labels as label=path")
        seen[label] = p
    return items


def start_sources(config):
    """{start: the checkpoint it loads} of the start models a run's config fine-tunes; scratch loads none. A
    protected model renormalised first (--renormalize) is another start than the checkpoint as it is."""
    started = config["start"]
    how = " renormalized" if config.get("renormalize") else ""
    sources = {label: str(path) + how for label, path in protected_items(config["path"])} if "sophon" in started else {}
    return {**sources, **({"normal": config.get("normal_path")} if "normal" in started else {}),
            **({"scratch": None} if "scratch" in started else {}),
            **({NULL_START: f"fresh init, seed + {NULL_SEED_OFFSET}"} if NULL_START in started else {})}


def _shared(ckpt):
    config = ckpt.get("config", {})
    return {"arch": ckpt["arch"], "num_classes": ckpt["num_classes"], "orig_dataset": config.get("orig_dataset"),
            "image_size": config.get("image_size"), "dataset": None if is_foreign(ckpt) else ckpt.get("dataset")}


def main(argv=None):
    args, interrupts = begin(parse_args, STAGE, argv, distributed=True)
    if args is None:
        return 0
    protected, paths = {}, {}
    for label, path in protected_items(args.path):
        paths[label] = resolve_checkpoint(path, "sophon_orig", "stage2_train", "--path")
        protected[label] = load_parent(paths[label], args, "--path")
        if len(protected) == 1:
            inherit(args, protected[label], paths[label], ("arch", "orig_dataset", "image_size"))
    labels = list(protected)
    sophon_path, sophon = paths[labels[0]], protected[labels[0]]
    first = _shared(sophon)
    for label in labels[1:]:
        for key, value in _shared(protected[label]).items():
            if value is not None and first[key] is not None and value != first[key]:
                raise cli.UsageError(f"--path: {label} ({paths[label]}) has {key} {value}, {labels[0]} has "
                                     f"{first[key]}; the protected models of one grid must share "
                                     f"{', '.join(SHARED)}")
    if is_foreign(sophon) and args.dataset is None:
        raise cli.UsageError(f"--path {sophon_path} is a plain weights file, which does not name the restricted "
                             f"domain: give --dataset")
    args.dataset = args.dataset or sophon["dataset"]
    check_name(args.dataset)
    starts = {**{label: protected[label]["model"] for label in labels}, "scratch": None, NULL_START: None}
    if args.renormalize:
        for label in labels:
            starts[label] = renormalized(starts[label], args.arch, protected[label]["num_classes"],
                                         args.image_size or 224)
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
    recorded = str(sophon_path) if labels == ["sophon"] else ",".join(f"{k}={v}" for k, v in paths.items())
    config = config_of(args, stage=STAGE, parent=str(sophon_path), path=recorded,
                       normal_path=str(normal_path) if normal_path else None, **foreign_record(sophon),
                       **(foreign_record(normal, "normal") if normal_path else {}))
    judged = (labels if "sophon" in args.start else []) + ([NULL_START] if NULL_START in args.start else [])
    compare = bool(judged) and "scratch" in args.start
    verdict_fn = (lambda results: [v for label in judged for v in scratch_verdicts(results, protected=label)]) \
        if compare else (lambda results: [])
    robustness_fn = (lambda results: {label: robustness_summary(results, protected=label) for label in judged}) \
        if compare else None
    chosen = [k for start in args.start for k in (labels if start == "sophon" else [start])]
    return run_stage3_script(
        args, interrupts, "sophon_orig", STAGE, starts={k: starts[k] for k in chosen},
        num_classes=sophon["num_classes"], train=train, evaluator=AccuracyEval(test), config=config,
        metric_keys=["test_acc"], verdict_fn=verdict_fn, robustness_fn=robustness_fn, sources_of=start_sources,
        title=f"Fine-tuning {args.arch} on {args.dataset}: {' vs '.join(labels)} vs normal vs scratch",
        notes=[f"{label}: {paths[label]}" for label in labels] + [f"normal: {normal_path}", f"test samples: {len(test)}"])


if __name__ == "__main__":
    cli.run(main)
