"""Known-answer tests of the paired statistics (common.stats) and of the paired fields of the robustness summary.

Curves are built so that the answer is known: a ratio fixed seed by seed, or a model drawn from the same
distribution as scratch, where chance says what it must score (a family below 1 half the time, a geometric mean of
1, a family-wise error no higher than alpha). Simulations use a fixed RNG seed; each is checked to within four of
its own Monte-Carlo standard errors, computed from the repetitions. numpy and scipy.stats are the independent
implementations the results are checked against.
"""
import math

import numpy as np
import pytest
from scipy import stats as sps

from common.stats import (benjamini_hochberg, compare_families, head_start_shown, holm, one_sided_alpha,
                          paired_log_ratio, split_seeds)
from common.verdicts import pooled_robustness, robustness_summary

SPREAD = 0.3  # run-to-run spread of an attack's AUC (log scale), as the simulation


def _r(start, seed, value, optimizer="momentum", diverged=None, fraction=0.1):
    """A result whose curve's AUC is `value` (shape 0.2, 0.6, 1 times value: AUC 0.6 * value)."""
    return {"start": start, "strategy": "direct_all", "optimizer": optimizer, "lr": 1e-2, "batch_size": 32,
            "train_fraction": fraction, "schedule": "constant", "seed": seed, "diverged_epoch": diverged,
            "test_acc_curve": [0.2 * value, 0.6 * value, value]}


def _mc(values):
    """(mean, Monte-Carlo standard error) of one statistic over independent repetitions."""
    values = np.asarray(values, dtype=float)
    return values.mean(), values.std(ddof=1) / len(values) ** 0.5


# ---- one family, several families: against scipy and by hand -----------------------------------------------------

def test_one_family_matches_scipy():
    x = np.random.default_rng(1).normal(0.1, 0.4, 6)
    v = paired_log_ratio(x, tests=4)
    assert v["n"] == 6 and v["ratio"] == pytest.approx(sps.gmean(np.exp(x)))
    two_sided = sps.ttest_1samp(x, 0.0)
    assert v["ci"] == pytest.approx(np.exp(two_sided.confidence_interval(0.95)))
    assert v["ci_simultaneous"] == pytest.approx(np.exp(two_sided.confidence_interval(1 - 0.05 / 4)))
    assert v["p_faster"] == pytest.approx(sps.ttest_1samp(x, 0.0, alternative="greater").pvalue)
    assert paired_log_ratio(x)["ci_simultaneous"] == pytest.approx(v["ci"])  # one family: nothing to correct
    # the test and the 95% interval agree: above 1 exactly where p_faster < 0.025
    for shift in np.linspace(-0.5, 0.8, 27):
        w = paired_log_ratio(x + shift)
        assert (w["ci"][0] > 1) == (w["p_faster"] < one_sided_alpha())
    one = paired_log_ratio([math.log(2)])
    assert one["ratio"] == pytest.approx(2) and one["ci"] is None and one["p_faster"] is None
    flat = paired_log_ratio([math.log(2)] * 3)
    assert flat["ci"] == pytest.approx([2, 2]) and flat["p_faster"] == 0.0
    assert paired_log_ratio([0.0] * 3)["p_faster"] == 1.0 and paired_log_ratio([]) is None


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 -> Holm: 4 * 0.005, 3 * 0.01, 2 * 0.03, max(1 * 0.04, 0.06)
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: 4 / k * p_(k) = 0.02, 0.02, 0.04, 0.04, then the running minimum from the top
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert holm([0.3, None, 0.01]) == pytest.approx([0.3, None, 0.02])  # an untested family is not counted
    assert benjamini_hochberg([None, 0.6, 0.5]) == [None, 0.6, 0.6]
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_corrections_match_their_definitions_and_scipy():
    rng = np.random.default_rng(2)
    for _ in range(20):
        p = rng.uniform(0, 0.2, rng.integers(1, 15)) ** rng.uniform(1, 3)
        assert benjamini_hochberg(list(p)) == pytest.approx(sps.false_discovery_control(p, method="bh"))
        # Holm's procedure at level a: reject the sorted p_(1), p_(2), ... while p_(j) <= a / (m - j + 1)
        order, adjusted = np.sort(p), holm(list(p))
        for a in (0.001, 0.01, 0.025, 0.05, 0.1):
            rejected = 0
            while rejected < len(p) and order[rejected] <= a / (len(p) - rejected):
                rejected += 1
            assert sum(q <= a for q in adjusted) == rejected


# ---- known ratios through the robustness summary ------------------------------------------------------------------

def test_known_ratios_the_old_mean_leans_above_one_and_the_headline_names_the_faster_family():
    # momentum: twice as fast as scratch in every seed; adam: 0.5, 2 and 1 times -> geometric mean 1, mean 7/6
    results = []
    for seed, (scratch, adam) in enumerate([(30, 0.5), (40, 2.0), (50, 1.0)]):
        results += [_r("scratch", seed, scratch), _r("sophon", seed, 2 * scratch), _r("normal", seed, 60),
                    _r("scratch", seed, scratch, "adam"), _r("sophon", seed, adam * scratch, "adam"),
                    _r("normal", seed, 60, "adam")]
    r = robustness_summary(results)
    cells = {c["optimizer"]: c for c in r["per_cell"]}
    twice, mixed = cells["momentum"]["vs_reference"], cells["adam"]["vs_reference"]
    assert twice["ratio"] == pytest.approx(2) and twice["ci"] == pytest.approx([2, 2]) and twice["faster"]
    assert mixed["ratio"] == pytest.approx(1) and cells["adam"]["auc_ratio_mean"] == pytest.approx(3.5 / 3)
    assert mixed["p_faster"] == pytest.approx(0.5) and not mixed["faster"]
    assert mixed["seeds"] == [0, 1, 2] and mixed["ci_simultaneous"] == pytest.approx(
        np.exp(sps.ttest_1samp(np.log([0.5, 2, 1]), 0).confidence_interval(1 - 0.05 / 2)))
    v = r["vs_reference"]
    assert v["families_tested"] == 2 and v["share_below_1"] == 0.0 and v["ratio_geomean"] == pytest.approx(2 ** 0.5)
    assert [f["optimizer"] for f in v["faster_holm"]] == ["momentum"] and v["faster_bh"] == v["faster_holm"]
    assert v["worst_family"]["optimizer"] == "momentum" and v["worst_family"]["ci"] == pytest.approx([2, 2])
    assert r["headline"].startswith("1 of 2 families learn faster than scratch (Holm-corrected over 2 families")
    assert "direct_all momentum lr 0.01 bs 32 train fraction 0.1 constant: ratio 2, simultaneous interval [2, 2]" in \
        r["headline"]
    slower = robustness_summary([dict(x, test_acc_curve=[y / 4 for y in x["test_acc_curve"]])
                                 if x["start"] == "sophon" else x for x in results])
    assert slower["headline"] == ("no family learns faster than scratch (Holm-corrected over 2 families, one-sided "
                                  "alpha 0.025 as for 95% intervals)")
    assert [f["optimizer"] for f in slower["vs_reference"]["slower_simultaneous"]] == ["momentum"]  # 0.5 always


def test_the_null_start_is_a_second_reference():
    # null 1.5 times as fast as scratch, the model 0.75 times: against null the model is at 0.5, seed by seed
    results = []
    for seed, scratch in enumerate([30, 40, 50]):
        results += [_r("scratch", seed, scratch), _r("null", seed, 1.5 * scratch), _r("sophon", seed, 0.75 * scratch)]
    r = robustness_summary(results)
    cell = r["per_cell"][0]
    assert cell["vs_reference"]["ratio"] == pytest.approx(0.75) and cell["vs_null"]["ratio"] == pytest.approx(0.5)
    assert r["vs_null"]["worst_family"]["ratio"] == pytest.approx(0.5)
    assert r["headline_vs_null"].startswith("no family learns faster than null (Holm-corrected over 1 family")
    assert robustness_summary(results, protected="null")["vs_null"] is None  # null is not judged against itself
    alone = robustness_summary([x for x in results if x["start"] != "null"])
    assert alone["vs_null"] is None and alone["headline_vs_null"] is None and alone["per_cell"][0]["vs_null"] is None


def test_a_diverged_seed_is_never_protection():
    # the model is 1.2 times as fast as scratch in seeds 2 and 3; in seed 0 it diverged (its curve stuck near
    # chance, a ratio far below 1 if counted), in seed 1 scratch diverged (every model's ratio inflated if counted)
    results = [_r("sophon", 0, 10, diverged=1), _r("scratch", 0, 40), _r("scratch", 1, 10, diverged=1),
               _r("sophon", 1, 48)]
    results += [x for seed in (2, 3) for x in (_r("scratch", seed, 40 + seed), _r("sophon", seed, 1.2 * (40 + seed)))]
    # adam: the model diverged in every seed -> no ratio at all, not a family below 1
    results += [x for seed in range(4) for x in (_r("scratch", seed, 40, "adam"),
                                                 _r("sophon", seed, 10, "adam", diverged=2))]
    r = robustness_summary(results)
    cells = {c["optimizer"]: c for c in r["per_cell"]}
    kept = cells["momentum"]
    assert kept["vs_reference"]["seeds"] == [2, 3] and kept["vs_reference"]["ratio"] == pytest.approx(1.2)
    assert kept["diverged_seeds"] == {"sophon": [0], "scratch": [1]} and kept["seeds_excluded"] == 2
    assert kept["auc_ratio_mean"] == pytest.approx((10 / 40 + 48 / 10 + 1.2 + 1.2) / 4)  # the old field counts them
    assert cells["adam"]["vs_reference"] is None and cells["adam"]["auc_ratio_mean"] == pytest.approx(0.25)
    assert cells["adam"]["diverged_seeds"] == {"sophon": [0, 1, 2, 3]}
    assert r["vs_reference"]["families"] == 1 and r["vs_reference"]["share_below_1"] == 0.0
    assert r["share_below_1"] == 0.5  # old: adam's diverged runs count as protection
    assert r["diverged"] == {"seeds_excluded": 6, "families": 2,
                             "by_start": {"sophon": 5, "scratch": 1, "normal": 0, "null": 0}}


# ---- a model drawn like scratch scores what chance says ------------------------------------------------------------

@pytest.mark.parametrize("seeds,reps", [(3, 100), (10, 40)])
def test_a_model_drawn_like_scratch_is_below_one_half_the_time(seeds, reps):
    rng = np.random.default_rng(seeds)
    new_share, new_log_geo, old_share, old_log_geo = [], [], [], []
    for rep in range(reps):
        level = rng.normal(0, 0.5, 30)  # families differ; within one, model and scratch are drawn alike
        draws = 40 * np.exp(level[:, None, None] + rng.normal(0, SPREAD, (30, seeds, 2)))
        results = [_r(start, seed, draws[f, seed, k], f"o{f}") for f in range(30) for seed in range(seeds)
                   for k, start in enumerate(("sophon", "scratch"))]
        r = robustness_summary(results)
        new_share.append(r["vs_reference"]["share_below_1"])
        new_log_geo.append(math.log(r["vs_reference"]["ratio_geomean"]))
        old_share.append(r["share_below_1"])
        old_log_geo.append(math.log(r["auc_ratio_geomean"]))
        if rep == 0:  # the summary against numpy, family by family
            logs = np.log(draws[..., 0] / draws[..., 1])
            assert [c["vs_reference"]["ratio"] for c in r["per_cell"]] == pytest.approx(np.exp(logs.mean(1)))
            assert new_share[0] == pytest.approx((logs.mean(1) < 0).mean())
            assert [c["vs_reference"]["p_faster"] for c in r["per_cell"]] == pytest.approx(
                sps.ttest_1samp(logs, 0, axis=1, alternative="greater").pvalue)
    share, share_se = _mc(new_share)
    assert abs(share - 0.5) < 4 * share_se
    log_geo, log_geo_se = _mc(new_log_geo)
    assert abs(log_geo) < 4 * log_geo_se
    # the old mean of per-seed ratios leans above 1: fewer families below 1, a geometric mean above 1
    old, old_se = _mc(old_share)
    assert old < 0.5 - 4 * old_se
    old_geo, old_geo_se = _mc(old_log_geo)
    assert old_geo > 4 * old_geo_se


def test_holm_keeps_a_null_models_familywise_error_at_alpha():
    rng = np.random.default_rng(3)
    reps, families, seeds = 1000, 30, 3
    logs = rng.normal(0, SPREAD, (reps, families, seeds)) - rng.normal(0, SPREAD, (reps, families, seeds))
    any_faster, any_below_05, any_bh, any_uncorrected = [], [], [], []
    for draw in logs:
        verdicts, summary = compare_families({f: list(x) for f, x in enumerate(draw)})
        any_faster.append(bool(summary["faster_holm"]))
        any_below_05.append(any(v["p_faster_holm"] < 0.05 for v in verdicts.values()))
        any_bh.append(bool(summary["faster_bh"]))  # under the global null the FDR is the family-wise error
        any_uncorrected.append(any(v["p_faster"] < one_sided_alpha() for v in verdicts.values()))
    for rate, alpha in ((any_faster, 0.025), (any_below_05, 0.05), (any_bh, 0.025)):
        mean, se = _mc(rate)
        assert mean <= alpha + 4 * se
    mean, se = _mc(any_uncorrected)  # uncorrected, 30 families: 1 - 0.975 ** 30 = 0.53
    assert abs(mean - (1 - 0.975 ** families)) < 4 * se
    # and the corrected test still finds a family that does learn faster: three times as fast over ten seeds,
    # found with probability 0.996 (noncentral t, as Holm's first step is Bonferroni's); 45 of 50 at the least
    found = 0
    for draw in logs[:50]:
        faster = {f: list(x) for f, x in enumerate(draw)}
        faster[0] = list(math.log(3) + rng.normal(0, SPREAD, 10) - rng.normal(0, SPREAD, 10))
        found += 0 in compare_families(faster)[1]["faster_holm"]
    assert found >= 45


# ---- eligibility on seeds the verdict does not use -----------------------------------------------------------------

def test_split_seeds_and_the_head_start_rule():
    assert split_seeds([4, 0, 3, 1, 2]) == ([0, 1], [2, 3, 4]) and split_seeds([7]) == ([], [7])
    assert head_start_shown([0.5]) is None and head_start_shown([0.5, 0.6, 0.7]) is True
    assert head_start_shown([0.5, -0.4, 0.1]) is False


def test_eligibility_on_held_out_seeds_does_not_favour_unlucky_scratch():
    # normal's true head start is 1.5 (log 0.4); the model is drawn like scratch. Families whose scratch was
    # unlucky look eligible more often; judged on the same seeds they would be below 1 less than half the time
    rng = np.random.default_rng(4)
    reps, families, seeds, head = 80, 30, 10, 0.4
    new, old, eligible = [], [], 0
    for _ in range(reps):
        level = rng.normal(0, 0.2, families)[:, None]
        noise = rng.normal(0, SPREAD, (3, families, seeds))
        values = 40 * np.exp(level + noise + np.array([0, 0, head])[:, None, None])  # scratch, model, normal
        results = [_r(start, seed, values[k, f, seed], f"o{f}") for f in range(families) for seed in range(seeds)
                   for k, start in enumerate(("scratch", "sophon", "normal"))]
        r = robustness_summary(results)
        judged = [c["eligibility"] for c in r["per_cell"] if c["eligibility"]["eligible"]]
        eligible += len(judged)
        new += [e["ratio"] < 1 for e in judged]
        old += [c["auc_ratio_mean"] < 1 for c in r["per_cell"] if c["shows_protection"]]
        assert r["eligibility"]["families_eligible"] == len(judged) and r["eligibility"]["families_undetermined"] == 0
        assert r["eligibility"]["share_below_1"] == pytest.approx(np.mean([e["ratio"] < 1 for e in judged]))
    assert 0.2 * reps * families < eligible < 0.8 * reps * families  # the rule does select
    share, se = _mc(new)
    assert abs(share - 0.5) < 4 * se
    old_share, old_se = _mc(old)  # the old rule, decided on the scratch runs it divides by
    assert old_share < 0.5 - 4 * old_se


def test_eligibility_undetermined_with_few_seeds_and_scratch_must_learn_on_the_held_out_seeds():
    results = [x for seed in range(3) for x in (_r("scratch", seed, 40), _r("sophon", seed, 20),
                                                _r("normal", seed, 60 + seed))]
    r = robustness_summary(results)
    e = r["per_cell"][0]["eligibility"]
    assert e["seeds"] == [0] and e["verdict_seeds"] == [1, 2] and e["eligible"] is None
    assert r["eligibility"]["families_undetermined"] == 1 and "undetermined" in r["eligibility"]["note"]
    assert r["per_cell"][0]["shows_protection"] is True  # the old rule decides on the same three seeds
    # four seeds: held out 0 and 1. sgd's scratch ends at 10 there (below half of momentum's 40), at 40 later
    results = []
    for seed in range(4):
        results += [_r("scratch", seed, 40), _r("sophon", seed, 20), _r("normal", seed, 60 + seed),
                    _r("scratch", seed, 10 if seed < 2 else 40, "sgd"), _r("sophon", seed, 20, "sgd"),
                    _r("normal", seed, 60 + seed, "sgd")]
    cells = {c["optimizer"]: c["eligibility"] for c in robustness_summary(results)["per_cell"]}
    assert cells["momentum"]["eligible"] is True and cells["momentum"]["ratio"] == pytest.approx(0.5)
    assert cells["sgd"]["reference_final"] == 10 and cells["sgd"]["reference_learned"] is False
    assert cells["sgd"]["head_start_shown"] is True and cells["sgd"]["eligible"] is False
    no_normal = robustness_summary([x for x in results if x["start"] != "normal"])
    assert [c["eligibility"]["eligible"] for c in no_normal["per_cell"]] == [None, False]


def test_runs_of_one_configuration_pool_the_paired_ratios_over_runs():
    results = []
    for seed, scratch in enumerate([30, 40, 50]):
        results += [_r("scratch", seed, scratch), _r("m#0", seed, 2 * scratch), _r("m#1", seed, 0.5 * scratch)]
    pooled = pooled_robustness({label: robustness_summary(results, protected=label) for label in ("m#0", "m#1")})
    cell = pooled["m"]["per_cell"][0]
    assert cell["vs_reference"]["ratio"] == pytest.approx(1) and cell["runs_faster_holm"] == 1
    assert pooled["m"]["vs_reference"]["share_below_1_mean"] == 0.5
    assert pooled["m"]["vs_reference"]["ratio_geomean"] == pytest.approx(1)
    assert set(pooled["m"]["vs_reference"]["headlines"]) == {"m#0", "m#1"}
