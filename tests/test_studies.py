"""Every study file runs at smoke scale, and the page its table command writes says what the run folders say.

No study file can rot without a red test: its commands run (the real flags, with the smoke section's scale
flags), its run folders are where the file says, a second `run` skips what is finished and resumes what is not,
and every number of every table is read back from the page and compared with the summary.json it came from.
"""
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.cli import UsageError
from common.study import command, dependencies, load_study, override
from common.tuned import describe_early_stop, describe_grid_edges

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "experiments").glob("*.toml"))


def study_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "common.study", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ), timeout=timeout)


def tables_of(page):
    """{section title: (header, rows)} of the markdown tables on a page, each row a list of cell strings."""
    tables, title, lines = {}, None, page.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("| ") and title not in tables and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                rows.append([c.strip() for c in row.strip()[1:-1].split(" | ")])
            tables[title] = ([c.strip() for c in line.strip()[1:-1].split(" | ")], rows)
    return tables


def close(cell, mean, std=None, digits=2):
    """A printed `mean` or `mean +- std` agrees with the values to the digits printed."""
    if mean is None:
        return cell == "-"
    parts = [float(p) for p in cell.split(" +- ")]
    want = [mean] if std is None else [mean, std]
    tol = 0.5 * 10 ** -digits + 1e-9
    return len(parts) == len(want) and all(abs(p - w) <= tol for p, w in zip(parts, want))


def interval_shown(cell, ci):
    """A printed `[low, high]` agrees with the interval `ci` (`-` where it is None)."""
    if ci is None:
        return cell == "-"
    low, high = cell.strip("[]").split(", ")
    return close(low, ci[0]) and close(high, ci[1])


def summary(folder):
    return json.loads((Path(folder) / "summary.json").read_text())


def folders(spec, root, name):
    """The run folders of run NAME, as the study file's layout promises: ROOT/NAME or ROOT/NAME/seedS."""
    entry = next((r for r in spec["run"] if r["name"] == name), None)
    if entry is None:
        return []
    if "seeds" in entry:
        return [(f"{name}#{s}", root / name / f"seed{s}") for s in entry["seeds"]]
    return [(name, root / name)]


def model(grid, spec, root, name):
    """(figures, pooled, labels) of model NAME in a stage-3 summary."""
    labels = [label for label, _ in folders(spec, root, name)] or [name]
    if name in grid.get("robustness_pooled", {}):
        return grid["robustness_pooled"][name], True, labels
    return grid["robustness"][labels[0]], False, labels


def check_robustness(table, spec, root, header, rows):
    grids = [summary(root / g) for g in table["grids"]]
    assert [r[0] for r in rows] == table["rows"]
    for row in rows:
        name, runs = row[0], folders(spec, root, row[0])
        accs = [summary(f)["orig_test_acc"] for _, f in runs]
        if len(accs) > 1:
            mean = sum(accs) / len(accs)
            std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5
            assert close(row[2], mean, std), (name, row[2])
        elif accs:
            assert close(row[2], accs[0]), (name, row[2])
        else:
            assert row[1:3] == ["-", "-"]
        cells = iter(row[3:])
        for grid in grids:
            figures, pooled, labels = model(grid, spec, root, name)
            for key in ("share_below_1", "share_below_1_where_shown", "auc_ratio_geomean",
                        "auc_ratio_geomean_where_shown"):
                cell = next(cells)
                ok = close(cell, figures[f"{key}_mean"], figures[f"{key}_std"]) if pooled else close(cell, figures[key])
                assert ok, (name, key, cell)
            if table.get("adaptive"):
                counts = [sum(c["optimizer"] in table["adaptive"] and c["auc_ratio_mean"] >= 1
                              for c in grid["robustness"][label]["per_cell"]) for label in labels]
                assert next(cells) == ", ".join(map(str, counts)), name
        assert next(cells, None) is None, f"{name}: more cells than the summaries give"


def check_paired(table, spec, root, header, rows):
    robustness = summary(root / table["grid"])["robustness"]
    labels = [label for name in table["rows"] for label in ([l for l, _ in folders(spec, root, name)] or [name])]
    assert [r[0] for r in rows] == labels
    for row in rows:
        m = robustness[row[0]]
        v, n, e, w = m["vs_reference"], m["vs_null"], m["eligibility"], m["vs_reference"]["worst_family"]
        assert row[1:4] == [str(v["families_tested"]), str(len(v["faster_holm"])),
                            str(len(v["slower_simultaneous"]))], row
        assert close(row[4], v["share_below_1"]) and close(row[5], v["ratio_geomean"]), row
        assert row[6].startswith(f"{w['strategy']} {w['optimizer']} lr {w['lr']:g}"), row
        assert close(row[7], w["ratio"]), row
        assert interval_shown(row[8], w["ci_simultaneous"]), row
        assert row[9] == str(m["diverged"]["seeds_excluded"]), row
        assert row[10] == ("-" if n is None else str(len(n["faster_holm"]))), row
        assert row[11] == f"{e['families_eligible']} / {e['families_ineligible']} / {e['families_undetermined']}"


def check_families(table, spec, root, header, rows):
    grid = summary(root / table["grid"])
    first = model(grid, spec, root, table["columns"][0])
    first_cells = grid["robustness"][first[2][0]]["per_cell"]
    assert len(rows) == len(first_cells) > 0
    for row, cell in zip(rows, first_cells):
        assert close(row[1], cell["reference_final"], digits=1)
        assert close(row[2], cell["head_start"])
        for name, printed in zip(table["columns"], row[3:]):
            figures, pooled, _ = model(grid, spec, root, name)
            same = [c for c in figures["per_cell"]
                    if all(c[k] == cell[k] for k in ("strategy", "optimizer", "lr", "batch_size", "train_fraction",
                                                       "schedule"))]
            assert len(same) == 1
            assert close(printed, same[0]["auc_ratio_mean"], same[0]["auc_ratio_std"] if pooled else None), \
                (name, printed)


def check_tuned(table, spec, root, header, rows):
    tuned = summary(root / table["grid"])["tuned"]["models"]
    labels = [label for name in table["rows"] for label in ([l for l, _ in folders(spec, root, name)] or [name])]
    assert [r[0] for r in rows] == labels
    runs = dict(f for name in table["rows"] for f in folders(spec, root, name))
    for row in rows:
        m = tuned[row[0]]
        v, w, n = m["vs_reference"], m["worst_family"], m["vs_null"]
        acc = summary(runs[row[0]]).get("orig_test_acc") if row[0] in runs else None
        assert close(row.pop(1), acc), row
        assert row[1:4] == [str(v["families_tested"]), str(len(v["faster_holm"])),
                            str(len(v["slower_simultaneous"]))], row
        del row[3]
        assert close(row[3], v["share_below_1"]) and close(row[4], v["ratio_geomean"]), row
        assert row[5] == " ".join(value if isinstance(value, str) else f"{title} {value:g}" for title, value in (
            ("strategy", w["strategy"]), ("optimizer", w["optimizer"]), ("bs", w["batch_size"]),
            ("train fraction", w["train_fraction"]), ("schedule", w["schedule"]))), row
        assert close(row[6], w["ratio"]), row
        assert interval_shown(row[7], w["ci_simultaneous"]), row
        assert row[8] == str(m["seeds_excluded"]), row
        assert row[9] == ("-" if n is None else str(len(n["faster_holm"]))), row


def check_defences(table, spec, root, header, rows):
    assert [r[0] for r in rows] == [e["label"] for e in table["rows"]]
    for entry, row in zip(table["rows"], rows):
        start = entry["start"]
        per_run = [{v["defence"]: v for v in summary(f)["defence_verdicts"]}
                   for _, f in folders(spec, root, entry["run"])]
        defences = header[4:-1]
        assert defences and all(list(r) == defences for r in per_run), (header, per_run)

        def shown(cell, rows_of, key):
            means = [r[f"{key}_mean"] for r in rows_of]
            if len(means) == 1:
                return close(cell, means[0], rows_of[0][f"{key}_std"], 1)
            mean = sum(means) / len(means)
            return close(cell, mean, (sum((m - mean) ** 2 for m in means) / (len(means) - 1)) ** 0.5, 1)

        before = [r[defences[0]] for r in per_run]
        acc, asr = row[3].split(" / ")
        assert shown(acc, before, f"before_test_acc_{start}") and shown(asr, before, f"before_asr_{start}"), row
        survived = 0
        for d, cell in zip(defences, row[4:-1]):
            cells = [r[d] for r in per_run]
            if table.get("show") == "reactivated":
                assert shown(cell, cells, f"reactivated_asr_{start}"), (d, cell)
            else:
                acc, asr = cell.split(" / ")
                assert shown(acc, cells, f"final_test_acc_{start}") and shown(asr, cells, f"final_asr_{start}"), cell
            survived += sum(c[f"final_asr_{start}_mean"] for c in cells) / len(cells) >= 50
        assert row[-1] == f"{survived} of {len(defences)}", row
        made = [summary(f) for _, f in folders(spec, root, entry.get("model", ""))]
        if len(made) == 1:
            s = made[0]
            assert row[2] == f"{s.get('orig_test_acc', s.get('test_acc')):.1f} / {s.get('orig_asr', s.get('asr')):.1f}"
        elif not made:
            assert row[2] == "-"


def check_cost(table, spec, root, header, rows):
    runs = [f for name in table["runs"] for f in folders(spec, root, name)]
    assert [r[0] for r in rows] == [label for label, _ in runs]
    for row, (label, folder) in zip(rows, runs):
        entries = [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]
        seconds = [e["seconds"] for e in entries]
        assert entries and all(s > 0 for s in seconds), label
        assert row[1] == ", ".join(sorted({e["numerics"] for e in entries})), row
        assert row[2:4] == [str(len(entries))] * 2, row
        assert close(row[4], sum(seconds) / len(seconds), digits=1) and close(row[5], sum(seconds) / 3600, digits=1)


def check_verdict_lines(page, table, spec, root, stem):
    """Under a paired or tuned table: each model's headline, word for word, and the forest plot drawn next to the
    page."""
    grid = summary(root / table["grid"])
    models = grid["tuned"]["models"] if table["kind"] == "tuned" else grid["robustness"]
    labels = [label for name in table["rows"] for label in ([l for l, _ in folders(spec, root, name)] or [name])]
    for label in labels:
        assert f"- **{label}**: {models[label]['headline']}\n" in page, label
    if table["kind"] == "tuned":
        assert "\n".join(describe_early_stop(grid["tuned"]["early_stop"])) in page
        assert "\n".join(describe_grid_edges(grid["tuned"]["sweep"])) in page
    figure = "tuned.png" if table["kind"] == "tuned" else f"paired_{table['grid']}.png"
    assert f"![{table['title']}]({stem}/{figure})" in page
    assert (root / stem / figure).read_bytes().startswith(b"\x89PNG")


CHECKS = {"robustness": check_robustness, "paired": check_paired, "families": check_families, "tuned": check_tuned,
          "defences": check_defences, "cost": check_cost}


UNDER_TORCHRUN = "tuned_suite"  # the study whose stage-3 run the smoke test gives to torchrun (--nproc 2)


@pytest.mark.slow
@pytest.mark.parametrize("study", STUDIES, ids=[s.stem for s in STUDIES])
def test_study_smoke_run_and_table(study, tmp_path):
    spec = tomllib.loads(study.read_text())
    root = tmp_path / "runs"
    nproc = ["--nproc", "2"] if study.stem == UNDER_TORCHRUN else []
    proc = study_cli("run", study, "--smoke", "--root", root, "--jobs", "2", *nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for entry in spec["run"]:
        for _, folder in folders(spec, root, entry["name"]):
            assert (folder / "summary.json").is_file(), folder

    # an unfinished run (its summary gone) is resumed with the script's --resume; finished ones are skipped
    last, folder = folders(spec, root, spec["run"][-1]["name"])[-1]
    (folder / "summary.json").unlink()
    proc = study_cli("run", study, "--smoke", "--root", root, *nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{last}: resuming" in proc.stdout
    if nproc:  # the stage-3 run went to torchrun's two ranks, both times
        log = (root / "logs" / f"{last.replace('#', '_seed')}.log").read_text()
        assert log.count("torch.distributed.run --standalone --nproc_per_node 2") == 2 and " on rank 1" in log
    assert proc.stdout.count("finished, skipped") == sum(len(r.get("seeds", [0])) for r in spec["run"]) - 1
    assert "--resume" in (root / "logs" / f"{last.replace('#', '_seed')}.log").read_text()

    proc = study_cli("table", study, "--smoke", "--root", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (root / f"{study.stem}.md").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert commit[:12] in page and f"python -m common.study table experiments/{study.name} --smoke" in page
    tables = tables_of(page)
    assert spec["table"], "a study without tables writes no results"
    for table in spec["table"]:
        header, rows = tables[table["title"]]
        CHECKS[table["kind"]](table, spec, root, header, rows)
        if table["kind"] in ("paired", "tuned"):
            check_verdict_lines(page, table, spec, root, study.stem)
    assert re.search(r"^## Runs$", page, re.M)


def test_override_replaces_or_adds():
    assert override(["--a", "1", "--b", "2"], ["--b", "3", "--c", "4"]) == ["--a", "1", "--b", "3", "--c", "4"]


def test_a_run_reading_a_later_one_is_refused(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[[run]]\nname = "a"\nscript = "sophon_orig/stage2_train/algo.py"\n'
                     'args = ["--model_path", "{b}"]\n'
                     '[[run]]\nname = "b"\nscript = "sophon_orig/stage1_pretrain/train.py"\n')
    with pytest.raises(UsageError, match="reads b, which is not a run listed before it"):
        load_study(study)


def test_a_seeded_run_reads_the_same_seed_of_an_earlier_one(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[[run]]\nname = "a"\nscript = "sophon_orig/stage1_pretrain/train.py"\nseeds = [0, 1]\n'
                     'args = ["--seed", "{seed}"]\n'
                     '[[run]]\nname = "b"\nscript = "sophon_orig/stage2_train/algo.py"\nseeds = [0, 1]\n'
                     'args = ["--model_path", "{a#{seed}}", "--seed", "{seed}"]\n')
    loaded = load_study(study, root=tmp_path / "runs")
    for seed in (0, 1):
        argv = command(loaded, loaded.run_of(f"b#{seed}"))
        assert argv[argv.index("--model_path") + 1] == str(tmp_path / "runs" / "a" / f"seed{seed}")
        assert argv[argv.index("--seed") + 1] == str(seed)
        assert dependencies(loaded, loaded.run_of(f"b#{seed}")) == [f"a#{seed}"]


def test_nproc_puts_stage_3_runs_under_torchrun_and_leaves_the_others(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[[run]]\nname = "a"\nscript = "sophon_orig/stage2_train/algo.py"\n'
                     '[[run]]\nname = "b"\nscript = "sophon_orig/stage3_eval/finetune_test.py"\n'
                     'args = ["--start", "sophon,scratch", "--path", "{a}"]\n')
    loaded = load_study(study, root=tmp_path / "runs")
    assert "torch.distributed.run" not in command(loaded, loaded.run_of("a"), nproc=4)
    argv = command(loaded, loaded.run_of("b"), nproc=4)
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert argv[argv.index("--starts") + 1] == "sophon,scratch" and "--start" not in argv
    assert command(loaded, loaded.run_of("b"))[1].endswith("finetune_test.py")


def test_seed_in_a_run_without_seeds_is_refused(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[[run]]\nname = "a"\nscript = "sophon_orig/stage1_pretrain/train.py"\n'
                     'args = ["--seed", "{seed}"]\n')
    with pytest.raises(UsageError, match="reads {seed} but has no seeds"):
        load_study(study)


@pytest.mark.parametrize("study", STUDIES, ids=[s.stem for s in STUDIES])
def test_study_file_loads_at_both_scales(study, tmp_path):
    for smoke in (False, True):
        loaded = load_study(study, smoke, tmp_path)
        assert all(r.folder.is_relative_to(tmp_path) for r in loaded.runs)
