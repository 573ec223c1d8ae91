"""Paired statistics under the stage-3 verdicts: a model against a reference, seed by seed, over attack families.

Every comparison is on log ratios: per seed, log(auc(model) / auc(reference)), both runs with that seed (the same
data order and head). A family's ratio is exp(mean log ratio), the geometric mean over its seeds; for a model drawn
like the reference its log is symmetric around 0, so it falls below 1 half the time. The mean of per-seed ratios
does not: E[x / y] > 1 for independent x, y of one distribution (Jensen), and it leans above 1.

A family is tested by a one-sided paired t test of H1: mean log ratio > 0 (the model learns faster than the
reference) at alpha = (1 - LEVEL) / 2 = 0.025, the level at which a family's two-sided 95% t interval (of the mean
log ratio, reported back as ratios) lies above 1: test and interval never disagree. Over the N families tested,
Holm's step-down adjusts the p-values for the family-wise error (the claim "no family learns faster") and
Benjamini-Hochberg's step-up for the false discovery rate (which families to look at); the simultaneous interval
is Bonferroni's two-sided 1 - (1 - LEVEL) / N interval, so the N intervals hold together with 95% confidence; its
lower end above 1 is a Bonferroni rejection at alpha, hence a Holm one (Holm, the more powerful, can also reject a
family whose simultaneous lower end is at or below 1), and its upper end at or below 1 says "slower than the
reference", family-wise.
"""
import math

from scipy.special import stdtr, stdtrit

LEVEL = 0.95  # two-sided confidence of every interval; the one-sided tests run at alpha = (1 - LEVEL) / 2
MIN_ELIGIBILITY_SEEDS = 2  # a head start's lower bound needs a t interval, so at least two seeds


def log_ratio(model_auc, reference_auc):
    """log(model / reference); None where either is not positive (a curve at 0 throughout has no log)."""
    if model_auc <= 0 or reference_auc <= 0:
        return None
    return math.log(model_auc / reference_auc)


def one_sided_alpha(level=LEVEL):
    """The one-sided tests' alpha that matches a two-sided `level` interval: (1 - level) / 2."""
    return round((1 - level) / 2, 12)


def _t_quantile(q, df):
    return float(stdtrit(df, q))


def paired_log_ratio(log_ratios, level=LEVEL, tests=1):
    """One family's log ratios (one per seed) summarised; None without any.

    ratio: exp(mean), the geometric mean of the per-seed ratios. ci: the two-sided `level` t interval of the mean
    log ratio, as ratios. ci_simultaneous: the two-sided 1 - (1 - level) / tests t interval (Bonferroni over
    `tests` families; ci itself where tests = 1). p_faster: the one-sided paired t test's p of H1: mean log
    ratio > 0. With one seed there is no interval and no test (None); with no spread (all seeds equal) the
    interval is that point and p_faster is 0 above 0, else 1."""
    values = [float(v) for v in log_ratios]
    n = len(values)
    if not n:
        return None
    mean = sum(values) / n
    out = {"n": n, "mean_log": mean, "std_log": None, "ratio": math.exp(mean), "ci": None, "ci_simultaneous": None,
           "p_faster": None}
    if n < 2:
        return out
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    se = std / n ** 0.5
    alpha = one_sided_alpha(level)
    half = _t_quantile(1 - alpha, n - 1) * se
    bound = _t_quantile(1 - alpha / tests, n - 1) * se
    out.update(std_log=std, ci=[math.exp(mean - half), math.exp(mean + half)],
               ci_simultaneous=[math.exp(mean - bound), math.exp(mean + bound)],
               p_faster=float(stdtr(n - 1, -mean / se)) if se > 0 else float(mean <= 0))
    return out


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the order given; a None (no test) stays None and is not counted."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    adjusted, running = [None] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(pvalues):
    """Benjamini-Hochberg's step-up adjusted p-values (q-values), in the order given; a None stays None."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    adjusted, running = [None] * len(pvalues), 1.0
    for rank in range(len(order) - 1, -1, -1):
        running = min(running, len(order) * pvalues[order[rank]] / (rank + 1))
        adjusted[order[rank]] = running
    return adjusted


def compare_families(log_ratios, level=LEVEL):
    """({family: verdict}, summary) of {family: [log ratio per seed]}, a model against one reference.

    A family's verdict: paired_log_ratio's fields, its simultaneous interval over the N families tested (those
    with two seeds or more), p_faster_holm and p_faster_bh (None where untested), and faster: p_faster_holm below
    alpha = one_sided_alpha(level). The summary: families (with a ratio), families_tested (N), share_below_1
    (share of the families whose ratio is below 1), ratio_geomean (exp of the mean over families of their mean
    log ratio), faster_holm / faster_bh (the families below alpha after each correction), slower_simultaneous
    (the tested families whose simultaneous upper end is at or below 1: slower than the reference, family-wise),
    worst_family (the largest ratio), alpha and level."""
    alpha = one_sided_alpha(level)
    first = {f: paired_log_ratio(v, level) for f, v in log_ratios.items()}
    first = {f: v for f, v in first.items() if v is not None}
    tested = sum(v["p_faster"] is not None for v in first.values())
    verdicts = {f: paired_log_ratio(log_ratios[f], level, max(tested, 1)) for f in first}
    pvalues = [v["p_faster"] for v in verdicts.values()]
    for v, h, b in zip(verdicts.values(), holm(pvalues), benjamini_hochberg(pvalues)):
        v.update(p_faster_holm=h, p_faster_bh=b, faster=h is not None and h < alpha)
    means = [v["mean_log"] for v in verdicts.values()]
    summary = {
        "families": len(verdicts), "families_tested": tested, "alpha": alpha, "level": level,
        "share_below_1": sum(m < 0 for m in means) / len(means) if means else None,
        "ratio_geomean": math.exp(sum(means) / len(means)) if means else None,
        "faster_holm": [f for f, v in verdicts.items() if v["faster"]],
        "faster_bh": [f for f, v in verdicts.items() if v["p_faster_bh"] is not None and v["p_faster_bh"] < alpha],
        "slower_simultaneous": [f for f, v in verdicts.items()
                                if v["ci_simultaneous"] is not None and v["ci_simultaneous"][1] <= 1],
        "worst_family": max(verdicts, key=lambda f: verdicts[f]["mean_log"]) if verdicts else None}
    return verdicts, summary


def _interval(ci):
    return "n/a" if ci is None else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def headline(verdicts, summary, reference="scratch", describe=str):
    """The verdict in one line: 'no family learns faster than <reference> (Holm-corrected over N families, ...)' or
    the families that do, each with its ratio and simultaneous interval; describe(family) names a family."""
    n, alpha = summary["families_tested"], summary["alpha"]
    if not n:
        return f"no family has two seeds or more to test against {reference}"
    scope = (f"Holm-corrected over {n} {'family' if n == 1 else 'families'}, one-sided alpha {alpha:g} as for "
             f"{summary['level']:.0%} intervals")
    untested = summary["families"] - n
    if untested:
        scope += f"; {untested} more with one seed untested"
    faster = summary["faster_holm"]
    if not faster:
        return f"no family learns faster than {reference} ({scope})"
    listed = "; ".join(f"{describe(f)}: ratio {verdicts[f]['ratio']:.3g}, simultaneous interval "
                       f"{_interval(verdicts[f]['ci_simultaneous'])}, Holm p {verdicts[f]['p_faster_holm']:.2g}"
                       for f in faster)
    return f"{len(faster)} of {n} families learn faster than {reference} ({scope}): {listed}"


def split_seeds(seeds):
    """(eligibility seeds, verdict seeds): the seeds sorted, the first half (rounded down) decides whether a family
    can show protection, the rest give its verdict; the split is fixed by the seed numbers alone, before any curve
    is seen, so a family's eligibility and its verdict rest on independent runs."""
    ordered = sorted(seeds)
    return ordered[:len(ordered) // 2], ordered[len(ordered) // 2:]


def head_start_shown(head_log_ratios, level=LEVEL):
    """Whether the baseline's head start over the reference is shown: the lower end of the two-sided `level` t
    interval of its mean log ratio is above 0 (its ratio above 1). None with fewer than MIN_ELIGIBILITY_SEEDS."""
    if len(head_log_ratios) < MIN_ELIGIBILITY_SEEDS:
        return None
    return paired_log_ratio(head_log_ratios, level)["ci"][0] > 1
