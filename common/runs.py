"""Run folders: resolved config, streamed metrics, summary, log, and interrupt handling.

runs/<project>/<stage>/<YYYYmmdd-HHMMSS>_<arch>_<dataset>/ holds config.json, metrics.csv, summary.json,
plots/, log.txt and checkpoints/. A folder holding another run is never overwritten.
"""
import csv
import datetime
import json
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

from common import dist
from common.checkpoints import CheckpointError, load_file
from common.files import REPO_ROOT, atomic_save, replace_atomically, write_json
from common.settings import UsageError, given_flags

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("sophon")


def default_run_dir(project, stage, arch, dataset):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = REPO_ROOT / "runs" / project / stage
    path = base / f"{stamp}_{arch}_{dataset}"
    n = 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base / f"{stamp}-{n}_{arch}_{dataset}"
    return path


def check_out_dir(out_dir):
    """Refuse a folder that already holds a run (or anything else): runs are never overwritten."""
    out_dir = Path(out_dir).resolve()
    if (out_dir / "config.json").exists():
        raise UsageError(f"--out_dir {out_dir} already holds a run; continue it with --resume {out_dir} "
                         f"or choose a new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UsageError(f"--out_dir {out_dir} is not empty; choose a new folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir {out_dir} is a file")
    return out_dir


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions():
    import numpy
    import torch
    import torchvision
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "numpy": numpy.__version__}
    try:
        import timm
        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def config_of(args, **extra):
    """The resolved flags as plain values; paths absolute, so the record means the same from any folder."""
    config = {k: (str(v.expanduser().resolve()) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(extra)
    return config


def canonical_path(value):
    """What a path flag means: absolute, and a run folder stands for the checkpoint it resolves to."""
    path = Path(value).expanduser().resolve()
    final = path / "checkpoints" / "final.pt"
    if path.is_dir() and (path / "config.json").is_file() and final.is_file():
        return final
    return path


class Run:
    """An open run folder. Create with `Run.start(...)` or `Run.resume(...)`."""

    def __init__(self, path):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.plots_dir = self.path / "plots"
        self.writes = True  # False on the ranks other than 0: they compute, rank 0 writes
        self._lock = None
        self.mirror = None  # --tensorboard: common.live.TensorBoardMirror, fed every CSV row

    @classmethod
    def start(cls, path, config):
        run = cls(path)
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        run.plots_dir.mkdir(exist_ok=True)
        run.lock()
        full = {"config": config, "argv": sys.argv, "git_commit": git_commit(), "versions": package_versions(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        write_json(run.path / "config.json", full)
        run._setup_logging()
        run.watch(config)
        log.info("run folder %s", run.path)
        log.info("config %s", json.dumps(config, default=str))
        return run

    @classmethod
    def follower(cls, path):
        """A rank other than 0 under torchrun: the same folder, read only; it logs only errors (rank 0 says
        the rest)."""
        run = cls(path)
        run.writes = False
        log.setLevel(logging.ERROR)
        return run

    @classmethod
    def open_existing(cls, path, config):
        """Reopen for --resume; a raised EXTENDABLE flag is written to config.json (with when and by which
        command, under `extended`) and the old summary.json removed: the run is unfinished again."""
        run = cls(path)
        run.lock()
        run._setup_logging()
        run.watch(config)
        log.info("resuming run %s", run.path)
        record = json.loads((run.path / "config.json").read_text())
        raised = {k: (record["config"][k], config[k]) for k in EXTENDABLE
                  if k in config and k in record["config"] and config[k] != record["config"][k]}
        if raised:
            record["config"].update({k: new for k, (_, new) in raised.items()})
            record.setdefault("extended", []).append({
                "flags": {k: [old, new] for k, (old, new) in raised.items()}, "argv": sys.argv,
                "at": datetime.datetime.now().isoformat(timespec="seconds")})
            write_json(run.path / "config.json", record)
            (run.path / "summary.json").unlink(missing_ok=True)
            log.info("extending the run: %s", ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in raised.items()))
        return run

    def lock(self):
        """Hold the folder for this process: a second process resuming it is refused, not interleaved.

        An flock, so the kernel releases it when the holder exits however it dies (SIGKILL included):
        a lock file left by a dead process is never mistaken for a live one."""
        if fcntl is None:  # no flock on this platform: unguarded, as before
            return
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(f"run folder {self.path} is in use by {holder}; wait for it to end or stop it, "
                             f"then --resume {self.path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {platform.node()}\n")
        handle.flush()
        self._lock = handle

    def unlock(self):
        if self.mirror is not None:
            self.mirror.close()
            self.mirror = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def _setup_logging(self):
        log.setLevel(logging.INFO)
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(self.path / "log.txt")):
            handler.setFormatter(fmt)
            log.addHandler(handler)
        log.propagate = False

    def watch(self, config):
        if config.get("tensorboard"):
            from common.live import TensorBoardMirror
            self.mirror = TensorBoardMirror(self.path / "tensorboard")

    def log_note(self, note):
        log.warning("NOTE: %s", note)

    def csv(self, name, header):
        if not self.writes:
            return _Discard(header)
        mirror = self.mirror
        return CSVLog(self.path / name, header,
                      mirror=None if mirror is None else lambda row: mirror(Path(name).stem, row))

    def save(self, obj, name):
        """A checkpoint under checkpoints/ (atomic); nothing on ranks other than 0."""
        if self.writes:
            atomic_save(obj, self.ckpt_dir / name)

    def write_summary(self, summary):
        if self.writes:
            write_json(self.path / "summary.json", summary)


def read_run_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there, so it is not a run folder")
    return json.loads(path.read_text())["config"]


def path_flags(parser):
    """Dest names of the flags whose values are paths (their argparse type is Path)."""
    return {a.dest for a in parser._actions if a.type is Path}


# Flags a resume may raise: stage 2's outer optimizers have constant lrs, so more loops continue the same
# training (a finished run included) rather than change it.
EXTENDABLE = ("total_loop",)


def apply_resume(args, argv_given, run_dir, paths,
                 skip=("resume", "out_dir", "device", "num_workers", "cache_dir", "tensorboard")):
    """The resumed run's config is authoritative; a repeated flag must equal it, but an EXTENDABLE one may
    be raised. `paths`: the path flags. Returns the raised flags, {name: (run's value, new value)}."""
    config = read_run_config(run_dir)
    raised = {}
    for key, value in config.items():
        if key in skip or not hasattr(args, key):
            continue
        mine = getattr(args, key)
        if key in paths and key in argv_given and mine is not None and value is not None:
            same = canonical_path(mine) == canonical_path(value)
        else:
            same = (str(mine) if isinstance(mine, Path) else mine) == value
        if key in argv_given and not same:
            if key in EXTENDABLE and mine > value:
                raised[key] = (value, mine)
                continue
            hint = "; it can only be raised, to train on" if key in EXTENDABLE else ""
            raise UsageError(f"--{key} {mine} differs from the resumed run's {value} ({run_dir}/config.json){hint}")
        setattr(args, key, Path(value) if key in paths and value else value)
    if args.out_dir is not None and Path(args.out_dir).resolve() != Path(run_dir).resolve():
        raise UsageError(f"--out_dir {args.out_dir} differs from --resume {run_dir}; omit it")
    args.out_dir = Path(run_dir).resolve()
    return raised


class CSVLog:
    """A CSV with a fixed header, appended and flushed row by row so a running job can be plotted."""

    def __init__(self, path, header, mirror=None):
        self.path, self.header, self.mirror = Path(path), list(header), mirror
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.header)

    def append(self, row):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_cell(row.get(k)) for k in self.header])
        if self.mirror is not None:
            self.mirror({k: row.get(k) for k in self.header})

    def rows(self):
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def rewrite(self, rows):
        tmp = self.path.with_name(f".{self.path.name}.tmp")

        def write():
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.header)
                for row in rows:
                    w.writerow([_cell(row.get(k)) for k in self.header])
        replace_atomically(tmp, self.path, write)

    def keep(self, predicate):
        """Drop rows (e.g. those after a resumed checkpoint's position)."""
        self.rewrite([r for r in self.rows() if predicate(r)])


class _Discard:
    """CSVLog's interface for ranks that write nothing."""

    def __init__(self, header):
        self.header = list(header)

    def append(self, row):
        pass

    def rows(self):
        return []

    def rewrite(self, rows):
        pass

    def keep(self, predicate):
        pass


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class Interrupts:
    """SIGINT/SIGTERM set a flag checked at loop boundaries; a second signal exits at once.

    Installed explicitly, because a job started with `&` from a script inherits SIGINT as ignored. Under
    torchrun the ranks agree at each boundary (`due()`), so all stop at the same one; there a second signal
    is not an exit: Ctrl-C reaches every rank twice (from the terminal and from the launcher), and the
    launcher escalates to SIGKILL itself when the ranks take too long.
    """

    def __init__(self, world=None):
        self.requested = False
        self.world = world or dist.world()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and not self.world.distributed:
            os._exit(130)
        if not self.requested:
            log.info("signal %s received: stopping at the next boundary%s", signal.Signals(signum).name,
                     "" if self.world.distributed else " (again to exit now)")
        self.requested = True

    def due(self):
        """Stop at this boundary? The same answer on every rank (a collective under torchrun)."""
        return self.world.any(self.requested)


def open_run(args, project, stage, dataset, config):
    """Start the run folder (after every check has passed) or reopen it for --resume. Under torchrun rank
    0 does so and the other ranks get a `Run` on the same folder that writes nothing."""
    world = dist.world()
    run = None
    if world.main:
        if args.resume is not None:
            run = Run.open_existing(args.out_dir, config)
        else:
            out = check_out_dir(args.out_dir) if args.out_dir is not None else default_run_dir(project, stage, args.arch, dataset)
            run = Run.start(out, config)
    path = world.share(str(run.path) if run else None)
    return run or Run.follower(path)


def is_finished(run_dir):
    """A run is finished once it wrote its summary without an error (a fault's summary says `error`)."""
    path = Path(run_dir) / "summary.json"
    try:
        return path.is_file() and "error" not in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


def preflight_resume(parser, args, project_stage, argv=None):
    """Resume rules before anything else runs; returns True when the run is already finished."""
    if args.resume is None:
        if args.out_dir is not None:
            check_out_dir(args.out_dir)
        return False
    run_dir = Path(args.resume).resolve()
    raised = apply_resume(args, given_flags(parser, argv), run_dir, path_flags(parser))
    if not is_finished(run_dir):
        return False
    if not raised:
        print(f"{project_stage}: run {run_dir} is already finished; nothing to resume")
        return True
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("stopped_early"):
        raise UsageError(f"--resume {run_dir}: the run stopped early at loop {summary.get('loops_completed')} "
                         f"(strikes in a row); more loops would stop it again")
    return False


class Interrupted(Exception):
    """Raised by a stage's loop at its boundary after a signal, once last.pt is written; `where` reads like
    "loop 3". `guarded` turns it into the message and exit code 130: one convention for every stage."""

    def __init__(self, where):
        super().__init__(where)
        self.where = where


def guarded(run, stage, body):
    """Run `body()`; an interrupt exits 130, a fault that stops the run is logged, summary.json written,
    exit code 1. A UsageError (e.g. an unreadable last.pt) passes through untouched: the one-line
    refusal, exit 2, and the run folder left as it was."""
    try:
        return body()
    except Interrupted as stop:
        if run.writes:
            log.info("interrupted at %s; continue with --resume %s", stop.where, run.path)
        return 130
    except UsageError:
        raise
    except Exception as err:  # the run folder must say why it stopped
        log.exception("run stopped by a fault")
        run.write_summary({"stage": stage, "error": f"{type(err).__name__}: {err}"})
        return 1
    finally:
        run.unlock()


def read_last(run):
    """checkpoints/last.pt of the run being resumed; an unreadable one (copied half-way, disk trouble) is a
    one-line refusal that names what can still be done. Under torchrun rank 0 reads it for every rank."""
    world = dist.world()
    if world.distributed:
        state, error = world.share(_try_read_last(run) if world.main else None)
        if error:
            raise UsageError(error)
        return state
    state, error = _try_read_last(run)
    if error:
        raise UsageError(error)
    return state


def _try_read_last(run):
    path = run.ckpt_dir / "last.pt"
    try:
        return load_file(path), None
    except CheckpointError as err:
        snapshots = [p for p in sorted(run.ckpt_dir.glob("loop*.pt"), reverse=True) if _readable(p)]
        hint = (f"its newest readable model snapshot is {snapshots[0]}: start a new run from it with "
                f"--model_path {snapshots[0]}, or start afresh without --resume" if snapshots
                else "start the run afresh without --resume")
        return None, f"cannot resume {run.path}: {err}; {hint}"


def _readable(path):
    try:
        load_file(path)
        return True
    except CheckpointError:
        return False


def close_run(run, stage, summary, test_samples, checkpoint=None):
    """summary.json with the keys every stage shares, then the plots."""
    from common.plots import plot_run  # matplotlib loads only where plots are drawn
    summary = {"stage": stage, **summary, "test_samples": test_samples}
    if checkpoint is not None:
        summary["checkpoint"] = str(Path(checkpoint).resolve())
    run.write_summary(summary)
    for path in plot_run(run.path):
        log.info("plot %s", path)
    log.info("summary %s", run.path / "summary.json")
    return summary


def begin(parse_args, stage, argv=None, distributed=False):
    """A stage script's start: parse, join torchrun's process group (stages that run `distributed`),
    install the interrupt handlers, apply --resume. Returns (None, None) when the resumed run is already
    finished."""
    parser, args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed:
        raise UsageError(f"{stage} runs in one process; start it without torchrun")
    world = dist.init_from_env(args.device) if distributed else dist.world()
    interrupts = Interrupts(world)
    if preflight_resume(parser, args, stage, argv):
        return None, None
    return args, interrupts
