"""Refusals through the real command lines: one stderr line, exit 2, and no run folder left behind.

All refused runs are started side by side once (module fixture); each test checks its own."""
import sys

import pytest

from helpers import SCRIPTS, load_script, run_scripts, tree_snapshot

SCRIPT_NAMES = {"stage1": "train.py", "stage2": "algo.py", "stage3": "finetune_test.py"}

# through a real process (the `cli.run(main)` wrapper, exit status and stderr as a shell sees them) ...
BAD_FLAGS = {
    "total_loop_0": ("stage2", ["--total_loop", "0"], "--total_loop"),
    "bad_grid_item": ("stage3", ["--lrs", "1e-3,abc"], "--lrs"),
}
# ... and many more through the same wrapper in-process (a process start costs seconds on a small machine)
BAD_FLAGS_IN_PROCESS = [
    ("stage2", ["--total_loop", "0"], "--total_loop"),
    ("stage2", ["--lr", "abc"], "--lr"),
    ("stage2", ["--alpha", "-1"], "--alpha"),
    ("stage2", ["--beta", "inf"], "--beta"),
    ("stage2", ["--fast_lr", "0"], "--fast_lr"),
    ("stage2", ["--arch", "vgg16"], "--arch"),
    ("stage2", ["--loss_type", "mse"], "--loss_type"),
    ("stage2", ["--adaptation_steps", "-2"], "--adaptation_steps"),
    ("stage2", ["--fts_optimizers", "sgd,lbfgs"], "--fts_optimizers"),
    ("stage2", ["--fts_head", "drop"], "--fts_head"),
    ("stage2", ["--fts_lr_range", "1e-2,1e-5"], "--fts_lr_range"),
    ("stage2", ["--fts_lr_range", "1e-3"], "--fts_lr_range"),
    ("stage2", ["--fts_lrs", "1e-2", "--fts_lr_range", "1e-4,1e-3"], "--fts_lr_range"),
    ("stage2", ["--fast_lr", "1e-2", "--fts_lr_range", "1e-4,1e-3"], "--fts_lr_range"),
    ("stage2", ["--fts_lr_adapt", "-0.1"], "--fts_lr_adapt"),
    ("stage2", ["--fts_lr_learned_share", "1.5"], "--fts_lr_learned_share"),
    ("stage2", ["--fts_lr_learned_share", "0"], "--fts_lr_learned_share"),
    ("stage2", ["--fts_schedules", "cosine,step"], "--fts_schedules"),
    ("stage2", ["--fts_step_weights", "linear"], "--fts_step_weights"),
    ("stage2", ["--preset", "strongest"], "--preset"),
    ("stage2", ["--bs", "1.5"], "--bs"),
    ("stage2", ["--mask_share", "1"], "--mask_share"),
    ("stage2", ["--sam_rho", "-0.1"], "--sam_rho"),
    ("stage2", ["--restricted_holdout", "0"], "--restricted_holdout"),
    ("stage2", ["--clean_loop", "-1"], "--clean_loop"),
    ("stage2", ["--clean_head", "own"], "--clean_head"),
    ("stage2", ["--clean_head", "separate"], "--clean_loop 0"),
    ("stage2", ["--clean_loop", "1", "--clean_head_reset", "5"], "--clean_head separate"),
    ("stage2", ["--clean_head_reset", "-1"], "--clean_head_reset"),
    ("stage2", ["--no_such_flag", "1"], "--no_such_flag"),
    ("stage1", ["--epochs", "0"], "--epochs"),
    ("stage1", ["--init", "random"], "--init"),
    ("stage1", ["--device", "tpu"], "--device"),
    ("stage1", ["--sam_rho", "nan"], "--sam_rho"),
    ("stage3", ["--start", "sophon,sratch"], "--start"),
    ("stage3", ["--optimizers", "sgd,nesterov"], "--optimizers"),
    ("stage3", ["--seeds", "0,-1"], "--seeds"),
    ("stage3", ["--batch_sizes", "8,1"], "--batch_sizes"),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, data_root, stage1_run):
    base = tmp_path_factory.mktemp("refused")
    empty = base / "empty"
    empty.mkdir()
    only_fashion = base / "only_fashion"
    only_fashion.mkdir()
    (only_fashion / "FashionMNIST").symlink_to(data_root / "FashionMNIST", target_is_directory=True)
    snapshot = tree_snapshot(stage1_run)
    cases = {name: (stage, [*argv, "--data_root", data_root, "--out_dir", base / name])
             for name, (stage, argv, _) in BAD_FLAGS.items()}
    cases.update({
        "missing_dataset": ("stage1", ["--orig_dataset", "CIFAR10", "--init", "scratch", "--data_root", empty,
                                       "--out_dir", base / "missing_dataset"]),
        "missing_restricted": ("stage2", ["--model_path", stage1_run, "--dataset", "SVHN", "--data_root", only_fashion,
                                          "--out_dir", base / "missing_restricted"]),
        "out_dir_holds_run": ("stage1", ["--orig_dataset", "FashionMNIST", "--image_size", "16", "--init", "scratch",
                                         "--data_root", data_root, "--out_dir", stage1_run]),
        "restricted_is_original": ("stage2", ["--model_path", stage1_run, "--dataset", "FashionMNIST",
                                              "--data_root", data_root, "--out_dir", base / "restricted_is_original"]),
        "missing_checkpoint": ("stage2", ["--model_path", base / "missing.pt", "--dataset", "MNIST",
                                          "--data_root", data_root, "--out_dir", base / "missing_checkpoint"]),
        "image_size_differs": ("stage2", ["--model_path", stage1_run, "--dataset", "MNIST", "--image_size", "32",
                                          "--data_root", data_root, "--out_dir", base / "image_size_differs"]),
    })
    names = list(cases)
    procs = run_scripts([cases[n] for n in names], max_parallel=4)
    return {"base": base, "empty": empty, "stage1_run": stage1_run, "snapshot": snapshot,
            **{n: (cases[n][0], p) for n, p in zip(names, procs)}}


def _assert_refused(refused, name, *needles):
    stage, proc = refused[name]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{SCRIPT_NAMES[stage]}: error: "), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "usage:" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    # every check runs before the run folder is created: a refused run creates nothing
    assert not (refused["base"] / name).exists()
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flag(refused, name):
    _assert_refused(refused, name, BAD_FLAGS[name][2])


@pytest.fixture(scope="module")
def script_modules():
    return {stage: load_script(stage) for stage in SCRIPTS}


@pytest.mark.parametrize("stage,argv,needle", BAD_FLAGS_IN_PROCESS)
def test_bad_flag_in_process(script_modules, tmp_path, monkeypatch, capsys, restore_signals, stage, argv, needle):
    from common import cli
    out = tmp_path / "run"
    argv = [*argv, "--out_dir", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS[stage]), *argv])
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: script_modules[stage].main(argv))
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{SCRIPT_NAMES[stage]}: error: "), captured.err
    assert needle in lines[0] and "usage:" not in captured.err
    assert not out.exists()


@pytest.mark.slow
def test_missing_dataset(refused):
    _assert_refused(refused, "missing_dataset", "CIFAR10", "python -m common.data fetch", str(refused["empty"]))
    assert list(refused["empty"].iterdir()) == []


@pytest.mark.slow
def test_missing_restricted_dataset_in_stage2(refused):
    _assert_refused(refused, "missing_restricted", "SVHN", "python -m common.data fetch")


@pytest.mark.slow
def test_out_dir_holding_another_run_is_refused_and_untouched(refused):
    _assert_refused(refused, "out_dir_holds_run", str(refused["stage1_run"]), "--resume")
    assert tree_snapshot(refused["stage1_run"]) == refused["snapshot"]


@pytest.mark.slow
def test_restricted_equal_to_original(refused):
    _assert_refused(refused, "restricted_is_original", "FashionMNIST")


@pytest.mark.slow
def test_missing_checkpoint(refused):
    _assert_refused(refused, "missing_checkpoint", "missing.pt")


@pytest.mark.slow
def test_flag_contradicting_the_parent_checkpoint(refused):
    # stage 1 ran at 16 px; --image_size 32 contradicts the parent checkpoint
    _assert_refused(refused, "image_size_differs", "--image_size")


@pytest.mark.slow
@pytest.mark.parametrize("flags, needle", [(["--bs", "3"], "--bs"),
                                           (["--fts_loop", "0", "--ntr_loop", "0"], "--clean_loop"),
                                           (["--fts_lr_adapt", "0.1"], "--fts_lr_range"),
                                           (["--fts_lr_learned_share", "0.5"], "--fts_lr_adapt"),
                                           (["--rescale_outer_lr"], "--rescale too")])
def test_stage2_refused_up_front_with_its_parent(script_modules, stage1_run, data_root, tmp_path, monkeypatch, capsys,
                                                 restore_signals, flags, needle):
    """Checks that need the parent checkpoint or the data: a batch too small to split, loops that do nothing."""
    from common import cli
    out = tmp_path / "run"
    argv = ["--model_path", str(stage1_run), "--dataset", "MNIST", "--total_loop", "1", *flags,
            "--adaptation_steps", "1", "--test_interval", "0", "--final_finetune_epochs", "0",
            "--data_root", str(data_root), "--out_dir", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS["stage2"]), *argv])
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: script_modules["stage2"].main(argv))
    assert info.value.code == 2 and needle in capsys.readouterr().err
    assert not out.exists()
