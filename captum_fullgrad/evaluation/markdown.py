r"""``results.md``: an :class:`~captum_fullgrad.evaluation.report.EvaluationReport` as Markdown.

Sections, in order: a header (run, model, accuracy), the overview table of the headline
scores, the rank per score, where FullGrad wins and loses (paired bootstrap), the ranking
of every headline score, the sections the registered metrics add
(:attr:`~captum_fullgrad.evaluation.metric.Metric.markdown`), the plots they declare, and
the settings. Nothing here names a metric: labels, directions, descriptions and
references come from the report, extra sections from the registry.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from captum_fullgrad.evaluation.metric import registered_metrics
from captum_fullgrad.evaluation.report import EvaluationReport, finite

__all__ = ["fmt", "markdown", "method_cell"]

#: The method whose wins and losses get a section of their own.
SUBJECT = "fullgrad"


def fmt(value: Optional[float], digits: int = 3) -> str:
    """A number for a table: fixed point, scientific when very large or small."""
    if value is None or not finite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e4 or magnitude < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def method_cell(report: EvaluationReport, method: str) -> str:
    """``Label (`name`)``, or ``name`` alone where the label is the name."""
    label = _cell(report.labels.get(method, method))
    return f"{label} (`{method}`)" if label != method else f"`{method}`"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table_head(header: Sequence[str]) -> List[str]:
    return [_row(header), "|" + "---|" * len(header)]


def headline(report: EvaluationReport) -> List[str]:
    """The headline score keys, in report order."""
    return [key for key, info in report.metrics.items() if info.headline]


def _header(report: EvaluationReport) -> List[str]:
    meta = report.meta
    data_seed = f" (data seed {meta['data_seed']})" if "data_seed" in meta else ""
    accuracy = 100 * meta.get("accuracy", float("nan"))
    return [
        f"# Saliency evaluation: model `{meta.get('model')}`",
        "",
        f"Generated {meta.get('date')} in {meta.get('wall_time_s', 0.0):.0f} s on "
        f"{meta.get('device')} ({meta.get('threads')} threads; torch {meta.get('torch')}, "
        f"captum {meta.get('captum')}, captum-fullgrad {meta.get('captum_fullgrad')}). "
        f"{meta.get('n')} images{data_seed}, metric seed {meta.get('seed')}; the model's "
        f"top-1 accuracy on them: {accuracy:.1f} %. Every map explains the image's true class.",
        "",
        "Values are means over images with 95 % percentile-bootstrap confidence intervals; "
        "↑ higher is better, ↓ lower is better; **bold** is the best mean. `n` is the number "
        "of images each metric was computed on (costly metrics use the first n images). "
        "Rows marked † do not beat the best control on that metric.",
        "",
    ]


def _overview(report: EvaluationReport, keys: List[str], best: Dict[str, Any]) -> List[str]:
    info = report.metrics
    lines = ["## Overview", ""]
    lines += _table_head(
        ["method"] + [f"{info[k].label} {info[k].arrow} (n={info[k].n})" for k in keys]
    )
    for method in report.methods:
        cells = [method_cell(report, method)]
        for key in keys:
            value = report.results[method].get(key)
            if value is None:
                cells.append("")
                continue
            text = fmt(value.mean)
            cells.append(f"**{text}**" if method == best[key] else text)
        lines.append(_row(cells))
    return lines + [""]


def ranks(report: EvaluationReport, keys: List[str]) -> Dict[str, Dict[str, int]]:
    """method -> score key -> rank (1 = best)."""
    rank_of: Dict[str, Dict[str, int]] = {m: {} for m in report.methods}
    for key in keys:
        for method, _, rank in report.ranking(key):
            rank_of[method][key] = rank
    return rank_of


def _rank_table(report: EvaluationReport, keys: List[str], rank_of: Dict[str, Any]) -> List[str]:
    """Mean rank over the headline scores (controls included)."""
    info = report.metrics
    lines = ["### Rank per metric", ""]
    lines += ["1 = best; ties share a rank. The last column is the mean rank over these metrics."]
    lines += [""]
    lines += _table_head(
        ["method"] + [f"{info[k].label} {info[k].arrow}" for k in keys] + ["mean rank"]
    )
    order = sorted(
        report.methods,
        key=lambda m: np.mean(list(rank_of[m].values())) if rank_of[m] else float("inf"),
    )
    for method in order:
        mine = rank_of[method]
        cells = [method_cell(report, method)]
        for key in keys:
            rank = mine.get(key)
            cells.append("" if rank is None else (f"**{rank}**" if rank == 1 else str(rank)))
        cells.append(f"{np.mean(list(mine.values())):.1f}" if mine else "")
        lines.append(_row(cells))
    return lines + [""]


def _verdict(report: EvaluationReport, metric: str, subject: str) -> Optional[Tuple[str, str, str]]:
    """(opponent, difference text, verdict) of ``subject`` on ``metric`` (paired bootstrap)."""
    info = report.metrics[metric]
    if metric not in report.results.get(subject, {}):
        return None
    best = report.best(metric)
    opponent = report.best(metric, exclude=(subject,)) if best == subject else best
    if opponent is None:
        return None
    diff = report.compare(subject, opponent, metric)
    better = diff.low > 0 if info.higher_is_better else diff.high < 0
    worse = diff.high < 0 if info.higher_is_better else diff.low > 0
    if best == subject:
        verdict = "**best** (significantly)" if better else "best, but not significantly"
    elif worse:
        verdict = "**loses** (significantly)"
    else:
        verdict = "loses, not significantly"
    text = f"{fmt(diff.mean)} [{fmt(diff.low)}, {fmt(diff.high)}]"
    return opponent, text, verdict


def _subject(report: EvaluationReport, keys: List[str], rank_of: Dict[str, Any]) -> List[str]:
    """Where the subject method wins and loses, score by score."""
    subject = SUBJECT
    if subject not in report.results:
        return []
    lines = [f"## Where `{subject}` wins and loses", ""]
    lines += [
        f"Paired comparison on the same images: `{subject}` minus the best other method "
        f"(or, where `{subject}` is best, minus the runner-up), mean difference and 95 % "
        "bootstrap interval of the per-image differences.",
        "",
    ]
    lines += _table_head(
        ["metric", "direction", "n", f"`{subject}`", "rank", "best other", "its value"]
        + ["difference [95 % CI]", "verdict"]
    )
    for key in keys:
        outcome = _verdict(report, key, subject)
        if outcome is None:
            continue
        opponent, text, verdict = outcome
        info = report.metrics[key]
        rank = f"{rank_of[subject].get(key, '')}/{len(report.ranking(key))}"
        mine, theirs = report.results[subject][key].mean, report.results[opponent][key].mean
        lines.append(
            _row(
                [info.label, info.direction, str(info.n), fmt(mine), rank, f"`{opponent}`"]
                + [fmt(theirs), text, verdict]
            )
        )
    return lines + [""]


def _rankings(report: EvaluationReport, keys: List[str], best: Dict[str, Any]) -> List[str]:
    """One ranked table per headline score; † marks methods that do not beat the best
    control."""
    real = [m for m in report.methods if not report.is_control(m)]
    lines = ["## Rankings per metric", ""]
    for key in keys:
        info = report.metrics[key]
        lines += [f"### {info.label}: {info.direction} (n = {info.n})", ""]
        description = info.description[0].upper() + info.description[1:]
        lines += [f"{description}. Reference: {info.reference}.", ""]
        lines += _table_head(["rank", "method", "mean", "95 % CI"])
        control = report.best(key, exclude=real)
        control_mean = report.results[control][key].mean if control else None
        for method, value, rank in report.ranking(key):
            name, mean = method_cell(report, method), fmt(value.mean)
            if method == best[key]:
                name, mean = f"**{name}**", f"**{mean}**"
            dagger = ""
            if control_mean is not None and not report.is_control(method):
                higher = info.higher_is_better
                beats = value.mean > control_mean if higher else value.mean < control_mean
                dagger = "" if beats else " †"
            interval = f"[{fmt(value.low)}, {fmt(value.high)}]"
            lines.append(_row([str(rank), f"{name}{dagger}", mean, interval]))
        lines.append("")
    return lines


def _plots(report: EvaluationReport) -> List[str]:
    """The plots of the registered metrics whose curves the report holds."""
    curves = {curve for method in report.curves.values() for curve in method}
    lines = ["## Plots", ""]
    for metric in registered_metrics():
        for plot in metric.plots:
            if any(panel[0] in curves for panel in plot.panels):
                lines += [f"![{plot.caption}]({plot.name}.png)", "", f"*{plot.caption}.*", ""]
    return lines


def _methods_table(report: EvaluationReport) -> List[str]:
    meta = report.meta
    lines = _table_head(["method", "kind", "parameters", "seconds per image (maps)"])
    for method in report.methods:
        info = meta.get("methods", {}).get(method, {})
        parameters = info.get("parameters", {}).items()
        params = ", ".join(f"{k}={v}" for k, v in parameters if v is not None) or "-"
        seconds = meta.get("map_seconds_per_image", {}).get(method)
        timing = "" if seconds is None else f"{seconds:.4f}"
        lines.append(_row([f"`{method}`", info.get("kind", ""), params, timing]))
    return lines + [""]


def _given_maps(report: EvaluationReport) -> List[str]:
    """Where the maps came from when they were not computed by the run (``--maps STORE``)."""
    meta = report.meta
    given = meta.get("maps_given")
    if not given:
        return []
    store = meta.get("maps_store", {})
    origin = f" from the attribution store `{store['path']}`" if store.get("path") else ""
    line = f"Maps of {', '.join(f'`{m}`' for m in given)} were read{origin}, not computed"
    recomputed = meta.get("maps_recomputed_by", [])
    line += (
        "; these metrics called the methods again (they need fresh maps): "
        + ", ".join(recomputed)
        + "."
        if recomputed
        else "; no metric called the methods again."
    )
    lines = [line, ""]
    excluded = store.get("excluded", [])
    if excluded:
        shown = ", ".join(f"`{e['id']}` ({e['reason']})" for e in excluded[:10])
        more = f" and {len(excluded) - 10} more" if len(excluded) > 10 else ""
        lines += [f"Images excluded, the store has no map of them: {shown}{more}.", ""]
    return lines


def _settings(report: EvaluationReport) -> List[str]:
    meta = report.meta
    subsets = meta.get("subsets", {})
    lines = ["## Settings", ""]
    per_metric = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in subsets.items())
    lines += [f"Images per metric: {per_metric}.", ""]
    settings = meta.get("settings", {})
    shown = {k: v for k, v in settings.items() if k != "method_params" and not k.startswith("n_")}
    lines += ["Metric settings: " + ", ".join(f"`{k}` = {v}" for k, v in shown.items()) + "."]
    lines += [""]
    lines += _given_maps(report)
    for metric in registered_metrics():
        note = metric.note(report) if metric.note else None
        if note:
            lines += [note, ""]
    lines += _methods_table(report)
    timings = meta.get("timings_s", {})
    if timings:
        stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in timings.items())
        lines += [f"Wall time per stage: {stages}.", ""]
    if meta.get("command"):
        lines += ["Command:", "", "```", str(meta["command"]), "```", ""]
    return lines


def markdown(report: EvaluationReport) -> str:
    """The report as a Markdown document (the sections listed in the module docstring)."""
    keys = headline(report)
    best = {key: report.best(key) for key in keys}
    rank_of = ranks(report, keys)
    lines = _header(report)
    lines += _overview(report, keys, best)
    lines += _rank_table(report, keys, rank_of)
    lines += _subject(report, keys, rank_of)
    lines += _rankings(report, keys, best)
    for metric in registered_metrics():
        if metric.markdown is not None:
            lines += metric.markdown(report)
    lines += _plots(report)
    lines += _settings(report)
    return "\n".join(lines)
