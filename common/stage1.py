"""Stage 1: plain (or poisoned) training on the original domain, resumable per epoch."""
import logging
import time

import torch

from common.checkpoints import atomic_save, load_file, make_checkpoint
from common.train import progress, train_epoch

log = logging.getLogger("sophon")


def run_stage1(args, run, model, train_domain, evaluate, device, precision, interrupts, meta, resume=False):
    """Train `args.epochs` epochs with Adam(lr); `evaluate(model)` -> {"test_acc": ..., ...} per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    epoch, train_acc, figures = 0, None, None
    if resume and (run.ckpt_dir / "last.pt").exists():
        state = load_file(run.ckpt_dir / "last.pt")
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
                                      desc=f"epoch {epoch}/{args.epochs}")
        figures = evaluate(model)
        metrics.append({"epoch": epoch, "train_loss": loss, "train_acc": train_acc, **figures,
                        "seconds": time.perf_counter() - start})
        log.info("epoch %d: loss %.4f train acc %.2f %s", epoch, loss, train_acc,
                 " ".join(f"{k} {v:.2f}" for k, v in figures.items()))
        if epoch % args.save_every == 0 or interrupts.requested or epoch == args.epochs:
            atomic_save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "train_acc": train_acc,
                         "figures": figures}, run.ckpt_dir / "last.pt")
        if interrupts.requested and epoch < args.epochs:
            log.info("interrupted at epoch %d; continue with --resume %s", epoch, run.path)
            return None
    summary = {"epochs": args.epochs, "train_acc": train_acc, **figures}
    atomic_save(make_checkpoint(model, metrics=summary, **meta), run.ckpt_dir / "final.pt")
    return summary
