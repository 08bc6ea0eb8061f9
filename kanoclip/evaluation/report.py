"""The evaluation report folder (``kanoclip eval --report-dir DIR``): tables, figures and per-image scores.

:class:`ReportWriter` is an ``observer`` of :func:`~kanoclip.evaluation.evaluate.evaluate` (and of
``sweep`` and ``few_shot``): it draws each class's figures while the evaluation still holds that
class's scores and maps, from the very arrays its metrics were computed on, then keeps only a row of
numbers per image. :meth:`ReportWriter.finish` writes the rest. The folder opens offline (no script,
no CDN):

* ``index.html`` — the markdown report's tables, then one section per dataset and class with its figures;
* ``report.md`` and ``metrics.json`` — what ``--report`` and ``--json`` write;
* ``scores.csv`` — one row per test image: ``dataset, class, path, defect, label, score, threshold,
  verdict`` (label 0 good, 1 anomalous; threshold the one the verdict used: the class's calibrated
  one where references give one, else the default); a sweep adds a ``variant`` column, one row per
  variant and image;
* PNG figures (matplotlib, Agg), per class: the image ROC and precision-recall curves (AUROC and AP
  in the legend), the score histogram of normal against anomalous images with the thresholds, the
  PRO curve up to FPR 0.3 where masks exist (:func:`~kanoclip.evaluation.metrics.pro_curve`, whose
  area is the AUPRO), and the worst cases at the F1-max threshold (the k highest-scoring good images,
  the k lowest-scoring anomalous ones: each image, its mask and its map overlaid). A sweep adds one
  chart per dataset comparing the variants per metric (the per-class figures are the first
  variant's); few-shot adds one chart per dataset of each metric against k (mean ± std).

Memory: nothing beyond the evaluation's own per-class arrays; the worst-case gallery decodes only
its 2k images. With several processes, only the main process observes and writes.
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from kanoclip.data import Sample
from kanoclip.errors import InputError
from kanoclip.evaluation.evaluate import ClassPredictions
from kanoclip.evaluation.metrics import DEFAULT_FPR_LIMIT, METRIC_KEYS, pro_curve
from kanoclip.fileio import atomic_write_json, atomic_write_text
from kanoclip.images import load_image
from kanoclip.references import f1_max_threshold
from kanoclip.viz import colorize, heatmap_overlay, save_png

SCORE_COLUMNS = ("dataset", "class", "path", "defect", "label", "score", "threshold", "verdict")
METRIC_NAMES = dict(
    zip(METRIC_KEYS, ("image AUROC", "image AP", "image F1-max", "pixel AUROC", "pixel AUPRO", "pixel F1-max"))
)
PLOTTED_POINTS = 2000  # a curve is thinned to about this many points for drawing (not for any number)
DPI = 100


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows.

    Args:
        worst: k, the good and the anomalous images shown each in the worst-case gallery.
        fpr_limit: where the PRO curve ends (the AUPRO's limit).
        tile: the side in pixels of one picture of the gallery.
    """

    worst: int = 4
    fpr_limit: float = DEFAULT_FPR_LIMIT
    tile: int = 180

    def __post_init__(self) -> None:
        if int(self.worst) != self.worst or self.worst < 1:
            raise ValueError(f"worst must be a whole number >= 1 (images per side of the gallery), got {self.worst}")
        if not 0 < self.fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {self.fpr_limit}")
        if self.tile < 32:
            raise ValueError(f"tile must be at least 32 px, got {self.tile}")


@dataclass
class _Section:
    """One dataset and class of the page: its figures (file, caption) and notes; ``stem`` names its files."""

    dataset: str
    class_name: str
    stem: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ReportWriter:
    """Collects each evaluated class's figures and scores, then writes the report folder.

    Usage: ``writer = ReportWriter(folder, model)``; ``evaluate(..., observer=writer.observe)``;
    ``writer.finish(results, markdown)``.
    """

    def __init__(self, folder: str | Path, model: Any, config: ReportConfig | None = None) -> None:
        """Args:
        folder: the report folder (made if missing; the report's files in it are replaced).
        model: the evaluated model (its default threshold and the classes' calibrated ones).
        config: what to show (default :class:`ReportConfig`).
        """
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"report folder {self.folder} is a file; name a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.config = config or ReportConfig()
        self.sections: list[_Section] = []
        self.rows: list[dict[str, Any]] = []
        self._names: set[str] = set()

    # ------------------------------------------------------------------ per class
    def thresholds(self, class_name: str) -> tuple[float, float | None]:
        """(the default threshold, the class's calibrated one or None), as ``detect`` decides."""
        refs = self.model.references(class_name)
        calibrated = float(refs.threshold) if refs is not None and refs.calibrated else None
        return float(self.model.config.scoring.threshold), calibrated

    def observe(self, result: ClassPredictions) -> None:
        """Keep one class's per-image rows and draw its figures (called by the evaluation)."""
        default, calibrated = self.thresholds(result.class_name)
        used = default if calibrated is None else calibrated
        several = len(result.predictions) > 1
        for variant, (scores, _) in result.predictions.items():
            for sample, label, score in zip(result.samples, result.labels, scores):
                self.rows.append(
                    ({"variant": variant} if several else {})
                    | {
                        "dataset": result.dataset,
                        "class": result.class_name,
                        "path": str(sample.image),
                        "defect": sample.defect,
                        "label": int(label),
                        "score": float(score),
                        "threshold": used,
                        "verdict": "anomalous" if score >= used else "normal",
                    }
                )
        section = _Section(result.dataset, result.class_name, self._stem(f"{result.dataset}-{result.class_name}"))
        if several:
            section.notes.append(f"Figures of variant {next(iter(result.predictions))!r}.")
        self._draw(
            section,
            result,
            [(default, "default threshold")]
            + ([(calibrated, "calibrated threshold")] if calibrated is not None else []),
        )
        self.sections.append(section)

    def _draw(self, section: _Section, result: ClassPredictions, lines: list[tuple[float, str]]) -> None:
        """The class's figures (of its first model) from the arrays its metrics were computed on."""
        variant, (scores, maps) = next(iter(result.predictions.items()))
        metrics = result.metrics[variant]
        stem = section.stem
        labels = np.asarray(result.labels)
        f1_threshold = None
        if labels.any() and not labels.all():
            figure = plot_roc_pr(labels, scores, metrics)
            self._save(section, figure, f"{stem}-roc-pr.png", "ROC curve and precision-recall curve")
            f1_threshold = f1_max_threshold(scores, labels)
            lines = [*lines, (f1_threshold, "F1-max threshold")]
        else:
            only = "anomalous" if labels.all() else "good"
            section.notes.append(f"No ROC curve, no F1-max threshold: the class has only {only} images.")
        self._save(section, plot_histogram(labels, scores, lines), f"{stem}-histogram.png", "Score histogram")
        if result.masks is not None and metrics.get("pixel_aupro") is not None:
            fpr, pro = pro_curve(result.masks, maps, self.config.fpr_limit)
            figure = plot_pro(fpr, pro, metrics["pixel_aupro"], self.config.fpr_limit)
            self._save(section, figure, f"{stem}-pro.png", f"PRO curve (FPR up to {self.config.fpr_limit:g})")
        threshold = lines[-1][0]  # F1-max where defined, else the one the verdicts used
        how = "F1-max" if f1_threshold is not None else "verdicts'"
        picked = worst_cases(labels, scores, self.config.worst)
        figure = plot_worst_cases(
            [result.samples[i] for i in picked],
            scores[picked],
            labels[picked],
            maps[picked],
            None if result.masks is None else result.masks[picked],
            threshold,
            self.config.tile,
        )
        self._save(section, figure, f"{stem}-worst.png", f"Worst-case gallery at the {how} threshold {threshold:.3f}")

    def _stem(self, text: str) -> str:
        """A file-name stem of ``text``, unique in this report."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "class"
        stem, n = base, 2
        while stem in self._names:
            stem, n = f"{base}-{n}", n + 1
        self._names.add(stem)
        return stem

    def _save(self, section: _Section, figure: Figure, name: str, caption: str) -> None:
        save_png(figure, self.folder / name)
        section.figures.append((name, caption))

    # ------------------------------------------------------------------ the folder
    def finish(self, results: Mapping[str, Any], markdown: str) -> Path:
        """Write ``metrics.json``, ``report.md``, ``scores.csv``, the summary charts and ``index.html``.

        Args:
            results: what the evaluation returned (``evaluate``, ``sweep`` or ``few_shot``).
            markdown: its markdown report (``format_report`` and its kin).

        Returns:
            The path of ``index.html``.
        """
        atomic_write_json(self.folder / "metrics.json", results)
        atomic_write_text(self.folder / "report.md", markdown)
        atomic_write_text(self.folder / "scores.csv", self._scores_csv())
        summary: list[tuple[str, str]] = []
        if "variants" in results:
            for key in next(iter(results["variants"].values()))["datasets"]:
                name = f"{self._stem(key + '-sweep')}.png"
                save_png(plot_sweep(results["variants"], key), self.folder / name)
                summary.append((name, f"Sweep: the variants per metric on {key} (mean over classes)"))
        if "zero_shot" in results:
            for key in results["zero_shot"]["datasets"]:
                name = f"{self._stem(key + '-shots')}.png"
                save_png(plot_shots(results, key), self.folder / name)
                summary.append((name, f"Few-shot: each metric against k on {key} (mean ± std over seeds)"))
        page = self._page(results, markdown, summary)
        return atomic_write_text(self.folder / "index.html", page)

    def _scores_csv(self) -> str:
        columns = (("variant",) if self.rows and "variant" in self.rows[0] else ()) + SCORE_COLUMNS
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "score": repr(row["score"]), "threshold": repr(row["threshold"])})
        return buffer.getvalue()

    def _page(self, results: Mapping[str, Any], markdown: str, summary: list[tuple[str, str]]) -> str:
        title = markdown.splitlines()[0].lstrip("# ").strip() if markdown else "KAnoCLIP evaluation"
        body = [markdown_to_html(markdown)]
        body += [_figure_html(name, caption) for name, caption in summary]
        body.append(
            "<p>Files: <a href='report.md'>report.md</a> · <a href='metrics.json'>metrics.json</a> · "
            "<a href='scores.csv'>scores.csv</a> (one row per test image)</p>"
        )
        if self.sections:
            links = (
                f"<a href='#{html.escape(s.stem)}'>{html.escape(f'{s.dataset} / {s.class_name}')}</a>"
                for s in self.sections
            )
            body.append("<p>Classes: " + " · ".join(links) + "</p>")
        for section in self.sections:
            heading = f"{section.dataset} / {section.class_name}"
            body.append(f"<section><h2 id='{html.escape(section.stem)}'>{html.escape(heading)}</h2>")
            body += [f"<p>{html.escape(note)}</p>" for note in section.notes]
            if "zero_shot" in results:
                body.append(_shots_table(results, section.dataset, section.class_name))
            body += [_figure_html(name, caption) for name, caption in section.figures]
            body.append("</section>")
        return PAGE.format(title=html.escape(title), body="\n".join(body))


# ---------------------------------------------------------------------------- figures
def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _thinned(x: np.ndarray, y: np.ndarray, points: int = PLOTTED_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``points`` of the curve's points, the first and last kept (drawing only)."""
    if len(x) <= points:
        return x, y
    index = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[index], y[index]


def plot_roc_pr(labels: np.ndarray, scores: np.ndarray, metrics: Mapping[str, Any]) -> Figure:
    """The image ROC curve and precision-recall curve side by side, AUROC and AP (the metrics') in the legends."""
    fig = _figure(10, 4.2)
    roc_ax, pr_ax = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(labels, scores)
    roc_ax.plot(fpr, tpr, label=f"AUROC {100 * metrics['image_auroc']:.1f}%")
    roc_ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    roc_ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Image ROC curve", xlim=(0, 1))
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr_ax.step(recall, precision, where="post", label=f"AP {100 * metrics['image_ap']:.1f}%")
    pr_ax.axhline(float(np.mean(labels)), ls=":", color="grey", label="chance (anomalous share)")
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is roc_ax else "lower left")
    fig.tight_layout()
    return fig


def plot_histogram(labels: np.ndarray, scores: np.ndarray, thresholds: Sequence[tuple[float, str]]) -> Figure:
    """Scores of the good and of the anomalous images, with each threshold as a vertical line."""
    fig = _figure(8, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    values = np.concatenate([scores, [t for t, _ in thresholds]])
    low, high = float(values.min()), float(values.max())
    pad = max(high - low, 1e-3) * 0.05
    bins = np.linspace(low - pad, high + pad, 31)
    for label, name, colour in ((0, "good", "tab:blue"), (1, "anomalous", "tab:red")):
        chosen = scores[labels == label]
        if chosen.size:
            ax.hist(chosen, bins=bins, alpha=0.55, color=colour, label=f"{name} ({chosen.size})")
    for (value, name), style in zip(thresholds, ("--", "-.", ":")):
        ax.axvline(value, color="black", ls=style, label=f"{name} {value:.3f}")
    ax.set(xlabel="image score", ylabel="images", title="Score histogram")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_pro(fpr: np.ndarray, pro: np.ndarray, aupro: float, fpr_limit: float) -> Figure:
    """The per-region-overlap curve up to ``fpr_limit``; the legend gives its AUPRO (area / limit)."""
    fig = _figure(6, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    x, y = _thinned(fpr, pro)
    ax.plot(x, y, label=f"AUPRO {100 * aupro:.1f}% (area / {fpr_limit:g})")
    ax.set(xlabel="pixel false-positive rate", ylabel="per-region overlap", title="PRO curve", xlim=(0, fpr_limit))
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def worst_cases(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest-scoring good images, then of the k lowest-scoring anomalous ones."""
    good = np.flatnonzero(labels == 0)
    bad = np.flatnonzero(labels == 1)
    good = good[np.argsort(-scores[good], kind="stable")][:k]
    bad = bad[np.argsort(scores[bad], kind="stable")][:k]
    return np.concatenate([good, bad]).astype(int)


def plot_worst_cases(
    samples: Sequence[Sample],
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    threshold: float,
    tile: int,
) -> Figure:
    """One column per image: the image, its ground-truth mask (where the class has masks) and its map overlaid.

    Good images are captioned FP (a false positive at ``threshold``) or TN, anomalous ones FN or TP.
    Images are shown at the maps' S×S (what the model saw, the whole image resized).
    """
    rows = 2 if masks is None else 3
    columns = max(len(samples), 1)
    fig = _figure(columns * tile / DPI + 0.4, rows * tile / DPI + 0.9)
    fig.suptitle(f"Worst cases at threshold {threshold:.3f}: highest-scoring good, lowest-scoring anomalous")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    size = maps.shape[-1]
    for column, (sample, score, label, anomaly_map) in enumerate(zip(samples, scores, labels, maps)):
        image = load_image(sample.image).resize((size, size), Image.Resampling.BICUBIC)
        flagged = score >= threshold
        kind = ("FP" if flagged else "TN") if label == 0 else ("TP" if flagged else "FN")
        what = "good" if label == 0 else sample.defect or "anomalous"
        axes[0, column].imshow(image)
        axes[0, column].set_title(f"{kind} · {what}\nscore {score:.3f}\n{Path(sample.image).name}", fontsize=8)
        if masks is not None:
            axes[1, column].imshow(colorize(masks[column].astype(np.float32), "gray"))
            axes[1, column].set_title("ground truth", fontsize=8)
        axes[-1, column].imshow(heatmap_overlay(image, anomaly_map))
        axes[-1, column].set_title("anomaly map", fontsize=8)
    fig.tight_layout()
    return fig


def _values(entry: Mapping[str, Any] | None, key: str) -> float:
    value = None if entry is None else entry.get(key)
    if isinstance(value, Mapping):
        value = value["mean"]
    return float("nan") if value is None else 100 * float(value)


def plot_sweep(variants: Mapping[str, Any], dataset: str) -> Figure:
    """Grouped bars: per metric, one bar per variant (its mean over the dataset's classes, %)."""
    fig = _figure(10, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    names = list(variants)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(METRIC_KEYS))
    for i, name in enumerate(names):
        mean = variants[name]["datasets"][dataset]["mean"]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [_values(mean, k) for k in METRIC_KEYS], width, label=name)
    ax.set_xticks(x, [METRIC_NAMES[k] for k in METRIC_KEYS], fontsize=8)
    ax.set(ylabel="%", title=f"Sweep on {dataset}: variants per metric", ylim=(0, 100))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_shots(results: Mapping[str, Any], dataset: str) -> Figure:
    """Each metric against k (0 = zero-shot), mean ± std over the seeds as error bars (%)."""
    fig = _figure(8, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    shots = list(results["shots"])
    ks = [0, *[int(k) for k in shots]]
    zero = results["zero_shot"]["datasets"][dataset]["mean"]
    for key in METRIC_KEYS:
        means = [_values(zero, key)] + [_values(results["shots"][k]["datasets"][dataset]["mean"], key) for k in shots]
        stds = [0.0] + [_std(results["shots"][k]["datasets"][dataset]["mean"].get(key)) for k in shots]
        if not all(np.isnan(means)):
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=METRIC_NAMES[key])
    ax.set_xticks(ks, ["zero-shot", *[f"{k}-shot" for k in shots]])
    ax.set(ylabel="%", title=f"Few-shot on {dataset}", ylim=(0, 100))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _std(value: Mapping[str, Any] | None) -> float:
    return 0.0 if value is None else 100 * float(value["std"])


# ---------------------------------------------------------------------------- the page
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2rem; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }}
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) {{ text-align: left; }}
blockquote {{ background: #fff3cd; margin: 0; padding: 0.5rem 1rem; }}
figure {{ margin: 1rem 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ font-style: italic; }}
</style></head>
<body>
{body}
</body></html>
"""


def _figure_html(name: str, caption: str) -> str:
    text = html.escape(caption)
    return f"<figure><img src='{html.escape(name)}' alt='{text}'><figcaption>{text}</figcaption></figure>"


def _inline(text: str) -> str:
    """Markdown's ``code`` and **bold** of one escaped line."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def markdown_to_html(markdown: str) -> str:
    """The evaluation reports' markdown as HTML: headings, quotes, bullets and tables (all they use)."""
    out: list[str] = []
    table: list[list[str]] = []
    bullets: list[str] = []

    def flush() -> None:
        if bullets:
            out.append("<ul>" + "".join(f"<li>{b}</li>" for b in bullets) + "</ul>")
            bullets.clear()
        if table:
            head, *rows = table
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
                + "</tbody></table>"
            )
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            if bullets:
                flush()
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):  # the alignment row
                table.append([_inline(cell) for cell in cells])
            continue
        if line.startswith("- "):
            if table:
                flush()
            bullets.append(_inline(line[2:]))
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith(">"):
            out.append(f"<blockquote>{_inline(line.lstrip('> ').strip())}</blockquote>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


def _shots_table(results: Mapping[str, Any], dataset: str, class_name: str) -> str:
    """One class's zero-shot row and k-shot rows (mean ± std over the seeds), in %."""
    zero = results["zero_shot"]["datasets"][dataset]["classes"][class_name]
    rows = [["zero-shot", *[_percent(zero.get(k)) for k in METRIC_KEYS]]]
    for k, entry in results["shots"].items():
        spread = entry["datasets"][dataset]["classes"].get(class_name, {})
        rows.append([f"{k}-shot", *[_percent(spread.get(key)) for key in METRIC_KEYS]])
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("setting", *METRIC_NAMES.values()))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _percent(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"
    return f"{100 * float(value):.1f}"
