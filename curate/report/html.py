"""The report page: one self-contained HTML file (inline CSS, images as data URIs) that opens from disk."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from html import escape
from typing import Any

THUMB_PX = 128
PLOT_DPI = 144

CSS = """
:root { --ink:#212529; --muted:#6c757d; --line:#e9ecef; --bg:#f6f7f9; --card:#fff; --accent:#1c7ed6;
        --kept:#2f9e44; --drop:#e8590c; --fail:#c92a2a; }
* { box-sizing: border-box; }
html { scroll-behavior: smooth; scroll-padding-top: 56px; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.wrap { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header.top { background: #1f2933; color: #f1f3f5; padding: 28px 0 22px; }
header.top h1 { margin: 0; font-size: 26px; font-weight: 650; letter-spacing: -0.01em; }
header.top h1 span { color: #9fb3c8; font-weight: 400; }
header.top .path { margin: 4px 0 18px; color: #9fb3c8; font-size: 13px; font-family: ui-monospace, Menlo, monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: rgba(255,255,255,0.07); border: 1px solid rgba(255,255,255,0.12); border-radius: 10px;
        padding: 10px 16px; min-width: 150px; }
.card b { display: block; font-size: 22px; font-weight: 650; color: #fff; }
.card small { color: #9fb3c8; font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
nav.toc { position: sticky; top: 0; z-index: 2; background: rgba(255,255,255,0.94); backdrop-filter: blur(6px);
          border-bottom: 1px solid var(--line); }
nav.toc .wrap { display: flex; gap: 22px; height: 46px; align-items: center; overflow-x: auto; }
nav.toc a { color: var(--muted); text-decoration: none; font-size: 14px; white-space: nowrap; }
nav.toc a:hover { color: var(--accent); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 12px; margin: 24px 0;
          padding: 20px 24px 24px; }
h2 { margin: 0 0 4px; font-size: 20px; }
h2 a, h3 a { color: inherit; text-decoration: none; }
h2 a:hover::after, h3 a:hover::after { content: " #"; color: var(--muted); }
h3 { margin: 22px 0 8px; font-size: 15px; }
p.lead { margin: 0 0 14px; color: var(--muted); }
p.note { color: var(--muted); font-style: italic; margin: 6px 0; }
img.plot { display: block; max-width: 100%; height: auto; margin: 14px 0 4px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { text-align: left; padding: 6px 14px 6px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.chip { display: inline-block; padding: 1px 8px; margin: 2px 4px 2px 0; border-radius: 999px; font-size: 12px;
        background: #fff4e6; color: #a84300; }
.chip.failed { background: #fff5f5; color: var(--fail); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(148px, 1fr)); gap: 14px; }
figure.cell { margin: 0; }
figure.cell .img { width: 100%; aspect-ratio: 1; background: #f1f3f5; border-radius: 8px; display: flex;
                   align-items: center; justify-content: center; overflow: hidden; }
figure.cell img { width: 100%; height: 100%; object-fit: contain; }
figure.cell .noimg { color: var(--muted); font-size: 12px; padding: 8px; text-align: center; word-break: break-all; }
figcaption { font-size: 12.5px; margin-top: 6px; line-height: 1.35; }
figcaption .cap { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden; }
figcaption .meta { color: var(--muted); font-size: 11.5px; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; padding: 0 6px; border-radius: 4px;
         color: #fff; background: var(--kept); }
.badge.dropped { background: var(--drop); }
.badge.failed { background: var(--fail); }
.group { display: flex; gap: 14px; padding: 12px 0; border-bottom: 1px solid var(--line); overflow-x: auto; }
.group figure.cell { width: 140px; flex: none; }
.group figure.cell.survivor .img { outline: 3px solid var(--kept); outline-offset: -3px; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 28px; }
@media (max-width: 820px) { .two { grid-template-columns: 1fr; } }
td.mono, .mono { font-family: ui-monospace, Menlo, monospace; font-size: 12px; word-break: break-all; }
footer { color: var(--muted); font-size: 12px; padding: 10px 0 40px; }
"""

SECTIONS = (
    ("funnel", "Funnel"),
    ("scores", "CLIP scores"),
    ("threshold", "Near the threshold"),
    ("removed", "Removed, by reason"),
    ("duplicates", "Duplicates"),
    ("validation", "Validation"),
)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk follows the 8-byte signature


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else escape(str(value))


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


class ReportPage:
    """Renders the stats document; `thumbs` maps uid -> JPEG bytes, `plots` name -> PNG bytes."""

    def __init__(self, stats: dict[str, Any], thumbs: dict[str, bytes], plots: dict[str, bytes]) -> None:
        self.stats, self.thumbs, self.plots = stats, thumbs, plots
        self.records: dict[str, dict[str, Any]] = stats.get("records") or {}

    def render(self) -> str:
        summary = self.stats["summary"]
        body = [self._header(summary), self._nav()]
        builders: dict[str, Callable[[], str]] = {
            "funnel": self._funnel,
            "scores": self._scores,
            "threshold": self._threshold,
            "removed": self._removed,
            "duplicates": self._duplicates,
            "validation": self._validation,
        }
        sections = [self._section(key, title, builders[key]()) for key, title in SECTIONS]
        footer = f'<footer class="wrap">curate · {escape(summary["generated"])} · numbers in report/stats.json</footer>'
        return (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>curate report — {escape(summary["name"])}</title><link rel="icon" href="data:,">'
            f"<style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body)
            + '\n<main class="wrap">\n'
            + "\n".join(sections)
            + "\n</main>\n"
            + footer
            + "\n</body></html>\n"
        )

    # ---- frame

    def _header(self, summary: dict[str, Any]) -> str:
        cards = [("input rows", _num(summary["input_rows"]) if summary["input_rows"] is not None else "–")]
        if summary["kept"] is not None:
            fraction = f" <small>{summary['kept_fraction']:.1%}</small>" if summary["kept_fraction"] is not None else ""
            cards.append(("kept", f"{summary['kept']:,}{fraction}"))
        if summary["model"]:
            cards.append(("model", escape(summary["model"])))
        cut = (self.stats.get("clip_score") or {}).get("cutoff")
        if cut is not None:
            cards.append(("CLIP cutoff", f"{cut:.3f}"))
        cards.append(("stages", str(len(summary["stages"]))))
        card_html = "".join(f'<div class="card"><small>{label}</small><b>{value}</b></div>' for label, value in cards)
        state = "" if summary["complete"] else " · <b>run not complete: no ledger yet</b>"
        stages = " → ".join(escape(s) for s in summary["stages"])
        return (
            '<header class="top"><div class="wrap">'
            f"<h1>curate report <span>{escape(summary['name'])}</span></h1>"
            f'<p class="path">{escape(summary["run"])} · {stages} · {escape(summary["generated"])}{state}</p>'
            f'<div class="cards">{card_html}</div></div></header>'
        )

    def _nav(self) -> str:
        links = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS)
        return f'<nav class="toc"><div class="wrap">{links}</div></nav>'

    @staticmethod
    def _section(key: str, title: str, content: str) -> str:
        return f'<section id="{key}"><h2><a href="#{key}">{escape(title)}</a></h2>\n{content}\n</section>'

    def _plot(self, name: str, alt: str) -> str:
        data = self.plots.get(name)
        if not data:
            return ""
        width = png_width(data) * 96 // PLOT_DPI  # drawn at PLOT_DPI for sharpness, shown at the CSS 96 dpi
        return f'<img class="plot" width="{width}" alt="{escape(alt)}" src="{data_uri(data, "image/png")}">'

    # ---- sections

    def _funnel(self) -> str:
        funnel = self.stats.get("funnel")
        if not funnel:
            return '<p class="note">No ledger or stats yet: the run has not finished its first stage.</p>'
        rows = []
        for stage in funnel:
            chips = "".join(
                f'<span class="chip {escape(k.split("/")[0])}">{escape(k.split("/", 1)[-1])} {v:,}</span>'
                for k, v in stage["removed"].items()
            )
            rows.append(
                f"<tr><td>{escape(stage['stage'])}</td><td class='num'>{stage['rows']:,}</td>"
                f"<td class='num'>{stage['kept']:,}</td><td class='num'>{stage['rows'] - stage['kept']:,}</td>"
                f"<td>{chips or '–'}</td></tr>"
            )
        table = (
            "<table><thead><tr><th>stage</th><th>in</th><th>kept</th><th>removed</th><th>why</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        lead = '<p class="lead">Every input row, followed through the stages; each row leaves once, with a reason.</p>'
        return lead + table + self._plot("funnel", "funnel chart")

    def _scores(self) -> str:
        scores = self.stats.get("clip_score")
        if not scores:
            return '<p class="note">No CLIP scores: the embed stage has not run.</p>'
        quantiles = scores["summary"].get("quantiles", {})
        head = "".join(f"<th>{float(q):.0%}</th>" for q in quantiles)
        cells = "".join(f"<td class='num'>{v:.3f}</td>" for v in quantiles.values())
        rule = _cutoff_rule(scores)
        return (
            f'<p class="lead">{scores["summary"]["count"]:,} embedded samples. {rule}</p>'
            + self._plot("histogram", "CLIP-score histogram")
            + self._plot("kept_fraction", "kept fraction vs threshold")
            + f"<h3>Quantiles</h3><table><tr>{head}</tr><tr>{cells}</tr></table>"
        )

    def _threshold(self) -> str:
        grids = self.stats.get("samples") or {}
        cutoff = grids.get("cutoff")
        if "kept_near_threshold" in grids:
            return (
                f'<p class="lead">The samples on either side of the cutoff {cutoff:.3f}: '
                "if the left ones look bad or the right ones look good, move the threshold.</p>"
                '<div class="two"><div><h3>Kept, just above</h3>'
                + self._grid(grids["kept_near_threshold"])
                + "</div><div><h3>Dropped for clip_score, just below</h3>"
                + (self._grid(grids["dropped_near_threshold"]) or '<p class="note">none</p>')
                + "</div></div>"
            )
        if "kept_lowest_scores" in grids:
            return (
                '<p class="lead">No CLIP threshold is set; the kept samples with the lowest scores:</p>'
                + self._grid(grids["kept_lowest_scores"])
            )
        if "kept_sample" in grids:
            lead = '<p class="lead">No CLIP scores in this run; a sample of the kept rows:</p>'
            return lead + self._grid(grids["kept_sample"])
        return '<p class="note">No ledger yet.</p>'

    def _removed(self) -> str:
        groups = (self.stats.get("samples") or {}).get("by_reason")
        if not groups:
            return '<p class="note">Nothing was removed.</p>' if groups == [] else '<p class="note">No ledger yet.</p>'
        parts = ['<p class="lead">A few rows per reason (the same ones on every rebuild).</p>']
        for group in groups:
            anchor = f"reason-{group['stage']}-{group['reason']}"
            parts.append(
                f'<h3 id="{escape(anchor)}"><a href="#{escape(anchor)}">{escape(group["reason"])}</a> '
                f'<span class="badge {escape(group["status"])}">{escape(group["status"])}</span> '
                f'<small class="meta">at {escape(group["stage"])} · {group["count"]:,} rows</small></h3>'
            )
            has_images = any(uid in self.thumbs for uid in group["uids"])
            parts.append(self._grid(group["uids"]) if has_images else self._row_table(group["uids"]))
        return "".join(parts)

    def _duplicates(self) -> str:
        groups = self.stats.get("duplicate_groups")
        if groups is None:
            return '<p class="note">No duplicate decisions: the dedup stage has not run.</p>'
        if not groups:
            return '<p class="note">No duplicates were found.</p>'
        parts = ['<p class="lead">The largest groups per kind; the survivor (best CLIP score) comes first.</p>']
        for reason in dict.fromkeys(g["reason"] for g in groups):
            parts.append(f"<h3>{escape(reason)}</h3>")
            for group in (g for g in groups if g["reason"] == reason):
                cells = [self._cell(group["kept_uid"], extra="survivor", survivor=True)]
                cells += [self._cell(d["uid"], similarity=d["similarity"]) for d in group["dropped"]]
                more = group["copies"] - len(group["dropped"])
                if more > 0:
                    cells.append(f'<div class="noimg meta">+{more} more</div>')
                parts.append(f'<div class="group">{"".join(cells)}</div>')
        return "".join(parts)

    def _validation(self) -> str:
        results = self.stats.get("validation")
        if not results:
            return '<p class="note">No validation results (validate/metrics.json) in this run.</p>'
        if results.get("format") == "arms":
            return self._arms_table(results)
        columns = results["columns"]
        head = "".join(f"<th>{escape(c)}</th>" for c in columns)
        body = "".join(
            f"<tr><td>{escape(name)}</td>" + "".join(f"<td>{_cell_value(row.get(c))}</td>" for c in columns) + "</tr>"
            for name, row in results["rows"].items()
        )
        table = f"<div style='overflow-x:auto'><table><tr><th></th>{head}</tr>{body}</table></div>"
        return table + self._plot("loss", "training loss curves")

    def _arms_table(self, results: dict[str, Any]) -> str:
        """One row per arm (mean ± std over seeds), one per pair (mean ± std of the per-seed differences, with
        the 95% interval below), the verdicts, then the plots."""
        columns = results["columns"]
        head = "".join(f"<th>{escape(label)}</th>" for _, label in columns)
        rows = []
        for arm in results["arms"]:
            samples = "" if arm["samples"] is None else f" <span class='meta'>({_num(arm['samples'])} samples)</span>"
            cells = "".join(f"<td>{mean:.3f} ± {std:.3f}</td>" for mean, std in (arm["cells"][k] for k, _ in columns))
            rows.append(f"<tr><td>{escape(arm['arm'])}{samples}</td>{cells}</tr>")
        for pair in results["pairs"]:
            cells = "".join(_paired_cell(pair["cells"][key]) for key, _ in columns)
            rows.append(f"<tr><td><b>{escape(pair['name'])}</b></td>{cells}</tr>")
        table = f"<div style='overflow-x:auto'><table><tr><th></th>{head}</tr>{''.join(rows)}</table></div>"
        note = (
            f"<p class='note'>{results['seeds']} seeds per arm, {_num(results['samples_seen'])} samples seen per run, "
            f"{_num(results['eval_images'])} eval images. Pair rows: mean ± std of the per-seed differences "
            "(both arms of a seed start from the same weights), 95% t-interval below; bold when the difference "
            "clears the bar.</p>"
        )
        verdicts = "".join(f"<li>{escape(line)}</li>" for pair in results["pairs"] for line in pair["verdicts"])
        plots = self._plot("paired", "per-seed differences between arms") + self._plot("loss", "training loss curves")
        return table + note + f"<ul class='verdicts'>{verdicts}</ul>" + plots

    # ---- cells

    def _grid(self, uids: Iterable[str]) -> str:
        cells = [self._cell(uid) for uid in uids]
        return f'<div class="grid">{"".join(cells)}</div>' if cells else ""

    def _cell(self, uid: str, extra: str = "", survivor: bool = False, similarity: float | None = None) -> str:
        record = self.records.get(uid, {})
        caption = record.get("caption") or ""
        thumb = self.thumbs.get(uid)
        if thumb is not None:
            image = f'<img alt="{escape(caption[:80])}" src="{data_uri(thumb, "image/jpeg")}">'
        else:
            image = f'<div class="noimg">no image<br>{escape(record.get("detail") or "")[:80]}</div>'
        meta = [f"score {_score(record['clip_score'])}"] if record.get("clip_score") is not None else []
        if similarity is not None:
            meta.append(f"sim {similarity:.3f}")
        if survivor and record.get("status") and record["status"] != "kept":
            meta.append(f"later {record['reason']}")
        badge = f'<span class="badge">{escape(extra)}</span> ' if extra else ""
        title = f"{uid}\n{record.get('url') or ''}"
        return (
            f'<figure class="cell{" survivor" if survivor else ""}" title="{escape(title)}">'
            f'<div class="img">{image}</div><figcaption>{badge}<span class="cap">{escape(caption) or "<i>(empty)</i>"}'
            f'</span><span class="meta">{" · ".join(meta)}</span></figcaption></figure>'
        )

    def _row_table(self, uids: list[str]) -> str:
        rows = []
        for uid in uids:
            record = self.records.get(uid, {})
            rows.append(
                f"<tr><td class='mono'>{escape(record.get('url') or '')}</td>"
                f"<td>{escape(record.get('caption') or '')}</td>"
                f"<td class='mono'>{escape(record.get('detail') or '')}</td></tr>"
            )
        return f"<table><tr><th>url</th><th>caption</th><th>detail</th></tr>{''.join(rows)}</table>"


def _cutoff_rule(scores: dict[str, Any]) -> str:
    cutoff = scores.get("cutoff")
    if cutoff is None:
        return "No CLIP-score filter was applied."
    parts = []
    if scores.get("threshold") is not None:
        parts.append(f"threshold {scores['threshold']:g}")
    if scores.get("top_fraction") is not None:
        parts.append(f"top {scores['top_fraction']:.0%}")
    rule = " and ".join(parts)
    return (
        f"Cutoff <b>{cutoff:.4f}</b>" + (f" (from {escape(rule)})" if rule else "") + ": scores below it are dropped."
    )


def _paired_cell(cell: dict[str, Any]) -> str:
    interval = cell.get("ci95")
    below = f"<br><span class='meta'>[{interval[0]:+.3f}, {interval[1]:+.3f}]</span>" if interval else ""
    text = f"{cell['mean']:+.3f} ± {cell['std']:.3f}"
    return f"<td>{f'<b>{text}</b>' if cell['passes'] else text}{below}</td>"


def _cell_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def render_report(stats: dict[str, Any], thumbs: dict[str, bytes], plots: dict[str, bytes]) -> str:
    return ReportPage(stats, thumbs, plots).render()


def render_gallery(title: str, subtitle: str, items: list[dict[str, Any]]) -> str:
    """A results page: items have uid, caption, score, url, clip_score and thumb (JPEG bytes or None)."""
    cells = []
    for item in items:
        thumb = item.get("thumb")
        image = (
            f'<img alt="{escape(item["caption"][:80])}" src="{data_uri(thumb, "image/jpeg")}">'
            if thumb
            else '<div class="noimg">no image</div>'
        )
        meta = f"match {item['score']:.3f} · score {_score(item.get('clip_score'))}"
        cells.append(
            f'<figure class="cell" title="{escape(item["uid"])}&#10;{escape(item.get("url") or "")}">'
            f'<div class="img">{image}</div><figcaption><span class="cap">{escape(item["caption"])}</span>'
            f'<span class="meta">{meta}</span></figcaption></figure>'
        )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{escape(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head>\n<body>'
        f'<header class="top"><div class="wrap"><h1>{escape(title)}</h1><p class="path">{escape(subtitle)}</p>'
        f'</div></header><main class="wrap"><section><div class="grid">{"".join(cells)}</div></section></main>'
        "</body></html>\n"
    )
