"""Studies as files: a study's stage commands, run resumably, and its results page written from the run folders.

    python -m common.study run experiments/adaptive_attacker.toml [--jobs N]    # runs/studies/adaptive_attacker/
    python -m common.study table experiments/adaptive_attacker.toml            # docs/results/adaptive_attacker.md
    python -m common.study run experiments/adaptive_attacker.toml --smoke      # same study, toy scale, synthetic
    python -m common.study table experiments/adaptive_attacker.toml --smoke    # its page, next to the smoke runs

A study file (TOML) lists its runs once, in order: `[[run]]` with `name`, `script` (a stage script, relative to the
repository), `args` (its flags; `@GROUP` expands to the list `[flags].GROUP`; `{seed}` is the run's seed and
`{NAME}` or `{NAME#SEED}` the run folder of an earlier run, `{NAME#{seed}}` the one of the same seed), optionally
`seeds` (one run per seed, named NAME#SEED) and `models` (earlier runs handed to a stage-3 script as `--path
label=folder,...`, a seeded run as NAME#SEED items, which stage 3 pools by NAME). `[[table]]` entries say what the
page shows (TABLES below); `[smoke]` has `data` (the datasets to write synthetic copies of) and `[smoke.flags]`, per
script, flags that replace the run's value or are added, so the smoke study is the real one at toy scale.

Each run has a fixed folder, ROOT/NAME or ROOT/NAME/seedS, given to its script as `--out_dir`. A run whose folder
holds a finished summary.json is skipped, one with a config.json is continued with the script's own `--resume`,
so rerunning `run` after an interrupt, a crash or a new run added to the file does only what is missing. `--jobs N`
runs N runs at a time; `--nproc P` runs each stage-3 run under torchrun in P processes (GPUs, or shares of the cores).
"""
import argparse
import datetime
import gzip
import json
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.files import REPO_ROOT
from common.cli import Parser, UsageError, run as run_cli
from common.plots import plot_forest
from common.runs import git_commit, is_finished
from common.tuned import describe, describe_early_stop, describe_grid_edges, family_of
from common.verdicts import attack_family, describe_family, mean_std

STUDIES_ROOT = REPO_ROOT / "runs" / "studies"  # ROOT of a study: STUDIES_ROOT/<study>, smoke: .../smoke/<study>
PAGES = REPO_ROOT / "docs" / "results"  # where `table` writes <study>.md
RUN_KEYS = {"name", "script", "args", "seeds", "models"}
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_#]+)\}")
NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Run:
    key: str  # NAME, or NAME#SEED for one seed of a seeded run
    name: str
    seed: object  # the seed of a seeded run, else None
    script: str
    args: tuple  # as written, groups expanded, {seed} filled (so {NAME#{seed}} names the same seed's run)
    models: tuple
    folder: Path


@dataclass
class Study:
    name: str
    file: Path
    title: str
    about: str
    runs: list
    tables: list
    smoke: dict  # the file's [smoke] section
    is_smoke: bool  # run it at toy scale: [smoke.flags] applied
    root: Path

    def run_of(self, key):
        return next(r for r in self.runs if r.key == key)

    def keys_of(self, name):
        """The run keys of run NAME: [NAME], or NAME#SEED per seed."""
        return [r.key for r in self.runs if r.name == name]


def _toml(path):
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError("study files are TOML: use Python >= 3.11, or `pip install tomli`") from None
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"{path}: {err}") from None


def _expand_groups(args, groups, where):
    out = []
    for token in args:
        if not isinstance(token, str):
            raise UsageError(f"{where}: every argument is a string; got {token!r}")
        if token.startswith("@"):
            if token[1:] not in groups:
                raise UsageError(f"{where}: {token} names no list under [flags]")
            out += _expand_groups(groups[token[1:]], groups, f"[flags].{token[1:]}")
        else:
            out.append(token)
    return out


def load_study(path, smoke=False, root=None):
    path = Path(path)
    spec = _toml(path)
    name = path.stem
    root = Path(root).resolve() if root else STUDIES_ROOT / ("smoke" if smoke else "") / name
    groups, runs, names = spec.get("flags", {}), [], set()
    for i, entry in enumerate(spec.get("run", [])):
        where = f"{path}: run {i + 1}"
        unknown = set(entry) - RUN_KEYS
        if unknown or not {"name", "script"} <= set(entry):
            raise UsageError(f"{where}: a run has name, script, args, and optionally seeds and models; "
                             f"got {sorted(entry)}")
        if not NAME.fullmatch(entry["name"]) or entry["name"] in names:
            raise UsageError(f"{where}: name {entry['name']!r} must be unique, of letters, digits and _")
        if not (REPO_ROOT / entry["script"]).is_file():
            raise UsageError(f"{where}: no script {entry['script']}")
        names.add(entry["name"])
        args = tuple(_expand_groups(entry.get("args", []), groups, where))
        models = tuple(entry.get("models", ()))
        for seed in entry.get("seeds", [None]):
            key, folder = (entry["name"], root / entry["name"]) if seed is None else \
                (f"{entry['name']}#{seed}", root / entry["name"] / f"seed{seed}")
            seeded = args if seed is None else tuple(t.replace("{seed}", str(seed)) for t in args)
            runs.append(Run(key, entry["name"], seed, entry["script"], seeded, models, folder))
    if not runs:
        raise UsageError(f"{path}: no [[run]] entries")
    study = Study(name, path, spec.get("title", name), spec.get("about", ""), runs, spec.get("table", []),
                  spec.get("smoke", {}), smoke, root)
    for run in runs:
        dependencies(study, run)  # every reference is checked before anything runs
    return study


def dependencies(study, run):
    """The keys of the earlier runs `run` reads (placeholders and models); an unknown or later one is an error."""
    earlier = [r.key for r in study.runs[:study.runs.index(run)]]
    needed = [m for token in run.args for m in PLACEHOLDER.findall(token)]
    if "seed" in needed:
        raise UsageError(f"{study.file}: run {run.key} reads {{seed}} but has no seeds")
    for model in run.models:
        needed += study.keys_of(model) or [model]
    for key in needed:
        if key not in earlier:
            raise UsageError(f"{study.file}: run {run.key} reads {key}, which is not a run listed before it")
    return needed


def override(args, flags):
    """`args` with each flag of `flags` (flag, value pairs) replacing that flag's value, or added."""
    args = list(args)
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def scales(run):
    """Whether `run` is a stage-3 grid, whose cells torchrun's ranks share out without changing any cell."""
    return "stage3_eval" in Path(run.script).parts


def command(study, run, data_root=None, nproc=1):
    """The command line of `run`: placeholders filled, models as --path, smoke flags and --data_root applied; a
    stage-3 run under torchrun with `nproc` processes where that is more than one (its --start spelt --starts,
    which torchrun's own parser leaves alone)."""
    args = [PLACEHOLDER.sub(lambda m: str(study.run_of(m.group(1)).folder), token) for token in run.args]
    if run.models:
        items = [f"{key}={study.run_of(key).folder}" for model in run.models for key in study.keys_of(model)]
        args = override(args, ["--path", ",".join(items)])
    if study.is_smoke:
        args = override(args, study.smoke.get("flags", {}).get(run.script, []))
    if data_root is not None:
        args = override(args, ["--data_root", str(data_root)])
    script = [str(REPO_ROOT / run.script), *args, "--out_dir", str(run.folder)]
    if nproc > 1 and scales(run):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        return [sys.executable, *launcher, *["--starts" if a == "--start" else a for a in script]]
    return [sys.executable, *script]


def state(run):
    if is_finished(run.folder):
        return "finished"
    return "interrupted" if (run.folder / "config.json").is_file() else "new"


# ---- synthetic data for --smoke: the real on-disk formats, images whose brightness is their class ----------

def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(f"{path}.gz", "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_smoke_data(root, names, n_train=200, n_test=40):
    """Tiny MNIST-format copies of `names` under `root` (kept if there), learnable in a few steps."""
    for i, name in enumerate(names):
        if name not in ("MNIST", "FashionMNIST"):
            raise UsageError(f"--smoke writes MNIST-format data only; give --data_root for {name}")
        raw = Path(root) / name / "raw"
        if raw.is_dir():
            continue
        raw.mkdir(parents=True)
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            rng = np.random.default_rng([i, n])
            labels = rng.permutation(np.arange(n) % 10)
            images = labels[:, None, None] * 20 + 20 + rng.integers(0, 30, size=(n, 28, 28))
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.clip(images, 0, 255))
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return Path(root)


# ---- run ---------------------------------------------------------------------------------------------------

def _log_path(study, run):
    return study.root / "logs" / f"{run.key.replace('#', '_seed')}.log"


def run_study(study, jobs=1, data_root=None, nproc=1):
    """Run what is missing, `jobs` runs at a time once their inputs are finished, each stage-3 run in `nproc`
    processes; 0 when all are finished."""
    if study.is_smoke and data_root is None:
        data_root = write_smoke_data(study.root / "data", study.smoke.get("data", []))
    todo, running, failed = [], {}, []
    for run in study.runs:
        if state(run) == "finished":
            print(f"{run.key}: finished, skipped ({run.folder})")
        else:
            todo.append(run)
    done = {r.key for r in study.runs} - {r.key for r in todo}
    try:
        while todo or running:
            ready = [r for r in todo if set(dependencies(study, r)) <= done]
            while ready and len(running) < jobs and not failed:
                run = ready.pop(0)
                todo.remove(run)
                running[run.key] = (run, _start(study, run, data_root, nproc))
            if not running:
                break
            for key, (run, proc) in list(running.items()):
                if proc.poll() is not None:
                    del running[key]
                    if proc.returncode == 0 and is_finished(run.folder):
                        done.add(key)
                        print(f"{key}: finished ({run.folder})")
                    else:
                        failed.append(key)
                        print(f"{key}: failed (exit {proc.returncode}); log {_log_path(study, run)}:\n"
                              + "".join(_log_path(study, run).read_text().splitlines(True)[-15:]), file=sys.stderr)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for run, proc in running.values():  # the stage scripts got the signal too: they save and stop
            proc.wait()
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if failed or todo:
        print(f"not finished: {', '.join(failed + [r.key for r in todo])}; fix the cause and run the same command "
              f"again: finished runs are skipped, the others resumed", file=sys.stderr)
        return 1
    return 0


def _start(study, run, data_root, nproc):
    argv = command(study, run, data_root, nproc)
    resume = state(run) == "interrupted"
    if resume:
        argv += ["--resume", str(run.folder)]
    log = _log_path(study, run)
    log.parent.mkdir(parents=True, exist_ok=True)
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"{run.key}: {'resuming' if resume else 'starting'}, log {log}")
    with open(log, "a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


# ---- table -------------------------------------------------------------------------------------------------

@dataclass
class Section:
    """What a table kind puts on the page: a table, the lines under it and its figures (file name -> a function
    drawing it to a path), saved next to the page and shown under the lines."""
    header: list
    rows: list
    after: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def _summary(run):
    if not is_finished(run.folder):
        raise UsageError(f"run {run.key} is not finished ({run.folder}); run the study first")
    return json.loads((run.folder / "summary.json").read_text())


def _fmt(mean, std=None, digits=2):
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} +- {std:.{digits}f}"


def _labels(summary, study, name):
    """The labels of model NAME in a stage-3 summary: NAME#SEED per stage-2 seed, else NAME (one run, or a start
    such as null)."""
    labels = [k for k in study.keys_of(name) if k in summary["robustness"]] or [name]
    if labels[0] not in summary["robustness"]:
        raise UsageError(f"{study.file}: table entry {name} is no model of this grid")
    return labels


def _robustness(summary, study, name):
    """(figures, pooled): the pooled summary of a model trained with several stage-2 seeds (keys _mean and _std
    over them), else the model's own."""
    pooled = summary.get("robustness_pooled", {}).get(name)
    if pooled:
        return pooled, True
    return summary["robustness"][_labels(summary, study, name)[0]], False


def _figure(figures, pooled, key, digits=2):
    return _fmt(figures[f"{key}_mean"], figures[f"{key}_std"], digits) if pooled else _fmt(figures[key], None, digits)


def robustness_table(study, spec):
    """One row per model: its stage-2 seeds and original accuracy, and per grid the robustness summary's share of
    families below 1, the same where protection can show, both geometric means (mean +- std over stage-2 seeds),
    and per seed the adaptive families at or above 1."""
    grids = {key: _summary(study.run_of(key)) for key in spec["grids"]}
    adaptive = spec.get("adaptive", [])
    header = ["configuration", "stage-2 seeds", "original acc"]
    for key in grids:
        header += [f"{key}: share < 1", "where shown", "geo-mean", "geo-mean where shown"]
        header += ["adaptive families >= 1, per seed"] if adaptive else []
    rows = []
    for name in spec["rows"]:
        keys = study.keys_of(name)
        accs = [_summary(study.run_of(k))["orig_test_acc"] for k in keys]
        acc = "-" if not keys else _fmt(*mean_std(accs)) if len(keys) > 1 else _fmt(accs[0])
        row = [name, str(len(keys)) if keys else "-", acc]
        for summary in grids.values():
            figures, pooled = _robustness(summary, study, name)
            row += [_figure(figures, pooled, k) for k in ("share_below_1", "share_below_1_where_shown",
                                                          "auc_ratio_geomean", "auc_ratio_geomean_where_shown")]
            if adaptive:
                counts = [sum(c["optimizer"] in adaptive and c["auc_ratio_mean"] >= 1
                              for c in summary["robustness"][label]["per_cell"])
                          for label in _labels(summary, study, name)]
                row.append(", ".join(map(str, counts)))
        rows.append(row)
    return Section(header, rows)


def _judged(study, names, models, judge):
    """The labels models NAMES have among `models` (what a stage-3 summary judged), in order: NAME#SEED for a
    seeded run, else NAME (a start no run made, such as null); a name it did not judge is an error."""
    labels = []
    for name in names:
        found = [k for k in study.keys_of(name) if k in models] or [name]
        if found[0] not in models:
            raise UsageError(f"{study.file}: table entry {name} is no model {judge} judged")
        labels += found
    return labels


def _headlines(headlines):
    return ["Each model's verdict in one line (its summary's `headline`):", "",
            *(f"- **{label}**: {line}" for label, line in headlines.items())]


def paired_table(study, spec):
    """One row per model of one grid (a model of several stage-2 seeds has a row per seed, NAME#SEED), from the
    robustness summary's paired fields (common.verdicts.robustness_summary): the families tested against scratch
    (two seeds or more), how many learn faster (Holm) and how many slower (simultaneous interval below 1), the share
    of family ratios below 1 and their geometric mean, the worst family with its ratio and simultaneous interval,
    the seeds left out for a divergence, how many families learn faster than null (Holm), and the families
    eligible / not / undetermined on seeds the verdict does not use."""
    robustness = _summary(study.run_of(spec["grid"]))["robustness"]
    header = ["model", "families tested", "faster than scratch (Holm)", "slower (simultaneous)", "share ratio < 1",
              "geo-mean ratio", "worst family", "worst: ratio", "worst: simultaneous CI", "seeds excluded",
              "faster than null (Holm)", "eligible / not / undetermined"]
    labels = _judged(study, spec["rows"], robustness, f"grid {spec['grid']}")
    rows = []
    for label in labels:
        m = robustness[label]
        v, n, e = m["vs_reference"], m["vs_null"], m["eligibility"]
        w = v["worst_family"]
        rows.append([label, str(v["families_tested"]), str(len(v["faster_holm"])),
                     str(len(v["slower_simultaneous"])), _fmt(v["share_below_1"]), _fmt(v["ratio_geomean"]),
                     "-" if w is None else describe_family(tuple(w[k] for k in attack_family())),
                     "-" if w is None else _fmt(w["ratio"]), "-" if w is None else _interval(w["ci_simultaneous"]),
                     str(m["diverged"]["seeds_excluded"]), "-" if n is None else str(len(n["faster_holm"])),
                     f"{e['families_eligible']} / {e['families_ineligible']} / {e['families_undetermined']}"])
    panels = {label: {tuple(c[k] for k in attack_family()): c["vs_reference"]
                      for c in robustness[label]["per_cell"]} for label in labels}
    return Section(header, rows, _headlines({label: robustness[label]["headline"] for label in labels}),
                   {f"paired_{spec['grid']}.png": lambda path: plot_forest(panels, attack_family(), path,
                                                                           what=f"grid {spec['grid']}")})


def families_table(study, spec):
    """One row per attack family of one grid: scratch's final accuracy, normal's head start, and each model's AUC
    ratio vs scratch (mean over attack seeds; a seeded run's mean +- std over its stage-2 seeds)."""
    summary = _summary(study.run_of(spec["grid"]))
    columns = spec["columns"]
    first = summary["robustness"][_labels(summary, study, columns[0])[0]]["per_cell"]
    varying = [k for k in attack_family() if len({c[k] for c in first}) > 1]
    header = ["attacker (" + ", ".join(varying) + ")", "scratch final acc", "head start (normal / scratch)", *columns]
    per_model = {}
    for name in columns:
        figures, pooled = _robustness(summary, study, name)
        per_model[name] = ({tuple(c[k] for k in attack_family()): c for c in figures["per_cell"]}, pooled)
    rows = []
    for cell in first:
        family = tuple(cell[k] for k in attack_family())
        row = [" ".join(str(cell[k]) for k in varying), _fmt(cell["reference_final"], digits=1),
               _fmt(cell["head_start"])]
        for name in columns:
            cells, pooled = per_model[name]
            c = cells.get(family)
            row.append("-" if c is None else _fmt(c["auc_ratio_mean"], c["auc_ratio_std"] if pooled else None))
        rows.append(row)
    return Section(header, rows)


def _interval(ci):
    return "-" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def tuned_table(study, spec):
    """One row per model a tuned suite judged (`grid`: a `--suite tuned` run; a model of several stage-2 seeds has a
    row per seed, NAME#SEED), from its summary.json's `tuned` (common.tuned.tuned_summary): its original accuracy
    (its stage-2 run's summary; - for a start no run of the study made, such as null), the families tested
    against tuned scratch, how many learn faster (Holm) and how many slower (simultaneous interval below 1), the
    share of family ratios below 1 and their geometric mean, the worst family with its ratio and simultaneous
    interval, the seeds left out for a divergence, and how many families learn faster than tuned null."""
    tuned = _summary(study.run_of(spec["grid"]))["tuned"]
    header = ["model", "original acc", "families tested", "faster than tuned scratch (Holm)",
              "slower than tuned scratch (simultaneous CI < 1)", "share ratio < 1",
              "geo-mean ratio", "worst family", "worst: ratio", "worst: simultaneous CI", "seeds excluded",
              "faster than tuned null (Holm)"]
    keys = {r.key for r in study.runs}
    labels = _judged(study, spec["rows"], tuned["models"], "the tuned suite")
    rows = []
    for label in labels:
        m = tuned["models"][label]
        v, w, n = m["vs_reference"], m["worst_family"], m["vs_null"]
        acc = _summary(study.run_of(label)).get("orig_test_acc") if label in keys else None
        rows.append([label, _fmt(acc), str(v["families_tested"]), str(len(v["faster_holm"])),
                     str(len(v["slower_simultaneous"])), _fmt(v["share_below_1"]), _fmt(v["ratio_geomean"]),
                     "-" if w is None else describe(family_of(w)),
                     "-" if w is None else _fmt(w["ratio"]), "-" if w is None else _interval(w["ci_simultaneous"]),
                     str(m["seeds_excluded"]), "-" if n is None else str(len(n["faster_holm"]))])
    names = tuned["families"]
    panels = {label: {tuple(r[k] for k in names): r["vs_reference"] for r in tuned["models"][label]["per_family"]}
              for label in labels}
    after = _headlines({label: tuned["models"][label]["headline"] for label in labels})
    after += ["", *describe_early_stop(tuned["early_stop"])] if tuned.get("early_stop") else []
    after += ["", *describe_grid_edges(tuned["sweep"])] if tuned["sweep"] else []
    return Section(header, rows, after,
                   {"tuned.png": lambda path: plot_forest(panels, names, path, f"tuned {tuned['reference']}",
                                                          "tuned attacker")})


def _defence_rows(study, run, start):
    """{defence: its defence_verdicts row} of stage-3 run `run`, for `start`; one row per defence (one lr etc.)."""
    rows = {}
    for row in _summary(study.run_of(run)).get("defence_verdicts", []):
        if f"final_asr_{start}_mean" in row:
            if row["defence"] in rows:
                raise UsageError(f"{study.file}: run {run} has several cells of defence {row['defence']} (lrs, "
                                 f"batch sizes or train fractions): a defences table shows one")
            rows[row["defence"]] = row
    if not rows:
        raise UsageError(f"{study.file}: run {run} defended no model {start!r}")
    return rows


def _pooled(per_run, key):
    """`key` of one run's row as mean +- std over its defence seeds; of a seeded run's rows, the mean +- std of
    their means over the stage-2 seeds."""
    if len(per_run) == 1:
        return _fmt(per_run[0].get(f"{key}_mean"), per_run[0].get(f"{key}_std"), 1)
    return _fmt(*mean_std([r.get(f"{key}_mean") for r in per_run]), 1)


def defences_table(study, spec):
    """One row per defended model (`rows`: label, the stage-3 run that defended it, its start there, and optionally
    the run that made it, for its original-domain accuracy and ASR): clean accuracy / ASR on the restricted test
    split before the defences and after each, or (`show = "reactivated"`) the ASR after the backdoor re-activation;
    then how many defences leave ASR >= 50. A seeded stage-3 run (one per stage-2 seed) is pooled: mean +- std over
    its seeds of the per-run means; one run: mean +- std over the defence seeds."""
    reactivated = spec.get("show", "after") == "reactivated"
    models = []
    for entry in spec["rows"]:
        per_run = [_defence_rows(study, key, entry["start"]) for key in study.keys_of(entry["run"])]
        if not per_run:
            raise UsageError(f"{study.file}: table row {entry['label']!r} names no run {entry['run']!r}")
        models.append((entry, per_run))
    defences = list(models[0][1][0])
    header = ["model", "runs", "original acc / ASR", "before", *defences, "ASR >= 50 after"]
    rows = []
    for entry, per_run in models:
        start = entry["start"]
        origin = [_summary(study.run_of(k)) for k in study.keys_of(entry.get("model", ""))]
        orig = "-" if not origin else " / ".join(
            _fmt(*(mean_std(v) if len(v) > 1 else (v[0], None)), 1)
            for v in ([s.get("orig_test_acc", s.get("test_acc")) for s in origin],
                      [s.get("orig_asr", s.get("asr")) for s in origin]))
        before = [r[defences[0]] for r in per_run]
        row = [entry["label"], str(len(per_run)) if len(per_run) > 1 else "1", orig,
               f"{_pooled(before, f'before_test_acc_{start}')} / {_pooled(before, f'before_asr_{start}')}"]
        survived = 0
        for d in defences:
            cells = [r.get(d) for r in per_run]
            if any(c is None for c in cells):
                row.append("-")
                continue
            survived += mean_std([c[f"final_asr_{start}_mean"] for c in cells])[0] >= 50
            row.append(_pooled(cells, f"reactivated_asr_{start}") if reactivated else
                       f"{_pooled(cells, f'final_test_acc_{start}')} / {_pooled(cells, f'final_asr_{start}')}")
        rows.append(row + [f"{survived} of {len(defences)}"])
    return Section(header, rows)


def cost_table(study, spec):
    """One row per stage-3 run (`runs`; a seeded run has a row per seed): the numerics its cells ran with, its
    cells, the mean seconds per cell (the cells that carry a time: common.stage3.Grid.cost) and the cell-hours in
    all, the time the grid takes in one process."""
    header = ["run", "numerics", "cells", "cells timed", "s / cell", "cell-hours"]
    rows = []
    for name in spec["runs"]:
        if not study.keys_of(name):
            raise UsageError(f"{study.file}: cost table entry {name} is no run of the study")
        for key in study.keys_of(name):
            cost = _summary(study.run_of(key)).get("cost")
            if cost is None:
                raise UsageError(f"{study.file}: run {key}'s summary.json records no cost (a stage-3 run written "
                                 f"before cells were timed)")
            per_cell = cost["cell_seconds"] / cost["cells_timed"] if cost["cells_timed"] else None
            rows.append([key, ", ".join(cost["numerics"]) or "-", str(cost["cells"]), str(cost["cells_timed"]),
                         _fmt(per_cell, digits=1), _fmt(cost["cell_seconds"] / 3600, digits=1)])
    return Section(header, rows)


TABLES = {"robustness": robustness_table, "paired": paired_table, "families": families_table, "tuned": tuned_table,
          "defences": defences_table, "cost": cost_table}


def markdown(header, rows):
    return [f"| {' | '.join(header)} |", f"| {' | '.join('---' for _ in header)} |",
            *(f"| {' | '.join(row)} |" for row in rows)]


def page(study, typed, figures_dir):
    """(text, figures) of the study's results page: every table from the run folders' summary.json files, each
    with its lines and figures, then the runs. figures: {path under the page's folder: function drawing it};
    `figures_dir` is the folder they go in, relative to the page."""
    commit = git_commit() or "unknown"
    lines = [f"# {study.title}", "",
             f"Written by `{typed}` at commit {commit[:12]} ({datetime.date.today().isoformat()}) from the run "
             f"folders under `{_shown(study.root)}`, which `{typed.replace(' table ', ' run ', 1)}` makes. "
             f"Do not edit: rerun the command.", ""]
    figures = {}
    if study.about:
        lines += [study.about.strip(), ""]
    for spec in study.tables:
        if spec.get("kind") not in TABLES:
            raise UsageError(f"{study.file}: table kind {spec.get('kind')!r}; known: {', '.join(TABLES)}")
        section = TABLES[spec["kind"]](study, spec)
        title = spec.get("title", spec["kind"])
        lines += [f"## {title}", ""]
        lines += [spec["note"].strip(), ""] if spec.get("note") else []
        lines += markdown(section.header, section.rows) + [""]
        lines += section.after + [""] if section.after else []
        for name, draw in section.figures.items():
            figures[f"{figures_dir}/{name}"] = draw
            lines += [f"![{title}]({figures_dir}/{name})", ""]
    lines += ["## Runs", "", "| run | folder | commit | command |", "| --- | --- | --- | --- |"]
    for run in study.runs:
        record = json.loads((run.folder / "config.json").read_text())  # argv and commit as the run recorded them
        argv = " ".join(["python", *record["argv"]]).replace(f"{REPO_ROOT}/", "")
        lines.append(f"| {run.key} | `{_shown(run.folder)}` | {(record.get('git_commit') or 'unknown')[:12]} | "
                     f"`{argv}` |")
    return "\n".join(lines) + "\n", figures


def _shown(path):
    path = Path(path)
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


# ---- command line ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = Parser(prog="python -m common.study", description=__doc__.splitlines()[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("run", "run what the study is missing"), ("table", "write the study's results page")):
        p = sub.add_parser(name, help=what)
        p.add_argument("study", type=Path, help="a study file, experiments/<study>.toml")
        p.add_argument("--smoke", action="store_true",
                       help="the same study at toy scale on synthetic data ([smoke] of the study file), under "
                            "runs/studies/smoke/<study>")
        p.add_argument("--root", type=Path, default=None,
                       help="the study's run folders (default runs/studies/<study>, or runs/studies/smoke/<study>)")
        if name == "run":
            p.add_argument("--jobs", type=int, default=1, help="runs at a time, once their inputs are finished")
            p.add_argument("--nproc", type=int, default=1,
                           help="processes per stage-3 run, under torchrun (one per GPU, or a share of the CPU "
                                "cores): its cells are dealt to them and each cell is the same computation; stage 1 "
                                "and 2 runs stay in one process, since there the world size changes the numbers")
            p.add_argument("--data_root", type=Path, default=None,
                           help="dataset root for every run (default: each script's; with --smoke, synthetic data "
                                "written under the study's root)")
        else:
            p.add_argument("--page", type=Path, default=None,
                           help="where to write the page (default docs/results/<study>.md, with --smoke "
                                "<root>/<study>.md)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    study = load_study(args.study, args.smoke, args.root)
    if args.command == "run":
        for flag in ("jobs", "nproc"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
        return run_study(study, args.jobs, args.data_root, args.nproc)
    typed = f"python -m common.study table {_shown(args.study.resolve())}" + (" --smoke" if args.smoke else "")
    out = args.page or (study.root / f"{study.name}.md" if args.smoke else PAGES / f"{study.name}.md")
    text, figures = page(study, typed, study.name)
    for name, draw in figures.items():
        draw(out.parent / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
