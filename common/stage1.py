"""Stage 1: plain (or poisoned) training on the original domain, resumable per epoch."""
import argparse
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from common.checkpoints import init_model, make_checkpoint
from common.cli import CommonSettings, SpeedSettings, nonneg_float, pos_float, pos_int
from common.data import check_name, check_subset_caps, load_domain
from common.files import atomic_save
from common.runs import Interrupted, close_run, config_of, guarded, open_run, read_last
from common.settings import Settings, compose, setting
from common.train import (AccuracyEval, Precision, ce_step, progress, resolve_device, sam_step, seed_everything,
                          train_epoch)

log = logging.getLogger("sophon")


def run_stage1(args, run, model, train_domain, evaluate, device, precision, interrupts, meta, resume=False):
    """Train `args.epochs` epochs with Adam(lr), each step sharpness-aware when `args.sam_rho` > 0;
    `evaluate(model)` -> {"test_acc": ..., ...} per epoch. Returns the summary, or raises Interrupted after
    writing last.pt."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = partial(sam_step, rho=args.sam_rho) if args.sam_rho else ce_step
    gen = torch.Generator().manual_seed(args.seed)
    epoch, train_acc, figures = 0, None, None
    if resume and (run.ckpt_dir / "last.pt").exists():
        state = read_last(run)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        epoch, train_acc, figures = int(state["epoch"]), state["train_acc"], state["figures"]
        log.info("resumed after epoch %d of %d", epoch, args.epochs)
    evaluate_keys = list(figures) if figures else list(evaluate(model))
    metrics = run.csv("metrics.csv", ["epoch", "train_loss", "train_acc"] + evaluate_keys + ["seconds"])
    metrics.keep(lambda r: int(r["epoch"]) <= epoch)
    train_fwd = precision.maybe_compile(model)
    for epoch in progress(range(epoch + 1, args.epochs + 1), initial=epoch, total=args.epochs, desc="stage 1"):
        start = time.perf_counter()
        loss, train_acc = train_epoch(train_fwd, train_domain, optimizer, device, precision, args.bs, gen,
                                      desc=f"epoch {epoch}/{args.epochs}", step=step)
        figures = evaluate(model)
        metrics.append({"epoch": epoch, "train_loss": loss, "train_acc": train_acc, **figures,
                        "seconds": time.perf_counter() - start})
        log.info("epoch %d: loss %.4f train acc %.2f %s", epoch, loss, train_acc,
                 " ".join(f"{k} {v:.2f}" for k, v in figures.items()))
        stop = interrupts.due()
        if epoch % args.save_every == 0 or stop or epoch == args.epochs:
            atomic_save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "train_acc": train_acc,
                         "figures": figures}, run.ckpt_dir / "last.pt")
        if stop and epoch < args.epochs:
            raise Interrupted(f"epoch {epoch}")
    summary = {"epochs": args.epochs, "train_acc": train_acc, **figures}
    atomic_save(make_checkpoint(model, metrics=summary, **meta), run.ckpt_dir / "final.pt")
    return summary


def run_stage1_script(args, interrupts, project, stage, make_train=None, make_evaluator=None):
    """Every check, then the run: `make_train(clean_train)` may poison the training data,
    `make_evaluator(test)` replaces the plain accuracy evaluator. Returns the exit code."""
    check_name(args.orig_dataset)
    load = partial(load_domain, args.orig_dataset, args.data_root, image_size=args.image_size, download=args.download,
                   cache_dir=args.cache_dir, num_workers=args.num_workers)
    train, test = load(train=True, cap=args.subset), load(train=False, cap=args.test_subset)
    check_subset_caps(args, [train, test])
    train, note = make_train(train) if make_train else (train, "")
    device = resolve_device(args.device)
    train.pin_for(device)
    precision = Precision(device, args.amp, args.channels_last, args.compile)
    seed_everything(args.seed)
    model, init_note, init_record = init_model(args.arch, train.num_classes, args.init, args.orig_dataset)
    model = precision.prepare(model)
    config = config_of(args, stage=stage, dataset=None, parent=None, **init_record)
    run = open_run(args, project, "stage1_pretrain", args.orig_dataset, config)
    for line in (init_note, note, train.note):
        if line:
            run.log_note(line)
    meta = dict(arch=args.arch, dataset=args.orig_dataset, stage=stage, parent=None, config=config)
    evaluator = make_evaluator(test) if make_evaluator else AccuracyEval(test)
    evaluate = partial(evaluator, device=device, precision=precision)

    def body():
        summary = run_stage1(args, run, model, train, evaluate, device, precision, interrupts, meta,
                             resume=args.resume is not None)
        close_run(run, stage, {"arch": args.arch, "orig_dataset": args.orig_dataset, **summary}, len(test),
                  run.ckpt_dir / "final.pt")
        return 0

    return guarded(run, stage, body)


def init_choice(text):
    """--init: imagenet, scratch, or an existing weights file (kept as an absolute path)."""
    if text in ("imagenet", "scratch"):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is neither imagenet, scratch nor an existing weights file")
    return str(path.resolve())


@dataclass
class Stage1Flags(Settings):
    epochs: int = setting(2, type=pos_int)
    lr: float = setting(1e-3, "Adam learning rate", type=pos_float)
    sam_rho: float = setting(0.0, "0: plain steps; > 0: sharpness-aware steps of this radius (SAM, Foret et al. "
                                  "2021; SBL, ECCV'24, trains its backdoor so, for a flatter, longer-lived backdoor)",
                             type=nonneg_float)
    init: str = setting("imagenet", "imagenet: torchvision/timm pretrained weights; scratch: random; PATH: a local "
                                    "weights file (torchvision/timm state_dict .pt/.pth or .safetensors): its body, "
                                    "and its head if the head's size fits the dataset",
                        type=init_choice, metavar="imagenet|scratch|PATH")
    save_every: int = setting(1, "write last.pt every N epochs", type=pos_int)


def stage1_settings(*groups):
    """A stage-1 script's settings: the common flags, `groups` (e.g. the trigger), stage 1's, the speed flags."""
    return compose("Settings", CommonSettings, *groups, Stage1Flags, SpeedSettings, arch="resnet18",
                   orig_dataset="ImageNette", bs=64)
