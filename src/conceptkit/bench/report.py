"""The HTML report every bench suite writes beside its results.md / report.md: `report.html`, one
self-contained file (plots embedded as base64 PNGs; images the markdown links to stay links).

    write_html_report(output, "conceptkit bench: speed", markdown_text,
                      [BarChart("step time", categories, {"sd15_tiny": [...], "wan21_tiny": [...]}, "s")])

The markdown is the suite's own results.md text (headings, tables, paragraphs, image links). Plots
need matplotlib; without it the report holds the tables and says why there are no plots.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

NO_MATPLOTLIB = "Plots omitted: matplotlib is not installed (pip install matplotlib); the tables are complete."


@dataclass
class BarChart:
    """Grouped bars: one group per category (x axis), one bar per series in each group. A None value
    leaves its bar out."""

    title: str
    categories: list[str]
    series: dict[str, list[float | None]] = field(default_factory=dict)
    ylabel: str = ""


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render_png(chart: BarChart) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    groups, names = len(chart.categories), list(chart.series)
    width = 0.8 / max(1, len(names))
    figure, axes = plt.subplots(figsize=(max(5.0, 0.9 * groups * max(1, len(names)) + 2), 3.6), dpi=100)
    try:
        for k, name in enumerate(names):
            points = [(g + (k - (len(names) - 1) / 2) * width, v) for g, v in enumerate(chart.series[name])
                      if v is not None]
            if points:
                axes.bar([x for x, _ in points], [v for _, v in points], width=width, label=name)
        axes.set_xticks(range(groups))
        axes.set_xticklabels(chart.categories, rotation=30 if groups > 4 else 0, ha="right" if groups > 4 else "center")
        axes.set_title(chart.title)
        axes.set_ylabel(chart.ylabel)
        if len(names) > 1:
            axes.legend(fontsize="small")
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)


def _inline(text: str) -> str:
    """Escape, then the few inline forms the suites' markdown uses: images, links, `code`, **bold**."""
    out = html.escape(text, quote=True)
    out = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", r'<img class="linked" alt="\1" src="\2">', out)
    out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(markdown: str) -> str:
    """Headings, pipe tables and paragraphs (what the bench writes), nothing more."""
    lines, parts, index = markdown.splitlines(), [], 0
    while index < len(lines):
        line = lines[index].rstrip()
        if not line.strip():
            index += 1
        elif line.lstrip().startswith("|"):
            block = []
            while index < len(lines) and lines[index].lstrip().startswith("|"):
                block.append(lines[index])
                index += 1
            rows = [_cells(r) for r in block if not re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", r)]
            header, body = rows[0], rows[1:]
            parts.append("<table>\n<thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr></thead>\n"
                         "<tbody>\n" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>\n"
                                               for row in body) + "</tbody>\n</table>")
        elif match := re.match(r"(#{1,6})\s+(.*)", line):
            level = len(match.group(1))
            parts.append(f"<h{level}>{_inline(match.group(2))}</h{level}>")
            index += 1
        else:
            paragraph = []
            while index < len(lines) and lines[index].strip() and not lines[index].lstrip().startswith(("|", "#")):
                paragraph.append(lines[index].strip())
                index += 1
            parts.append("<p>" + "<br>\n".join(_inline(p) for p in paragraph) + "</p>")
    return "\n".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f2f2f2}tbody tr:nth-child(even){background:#fafafa}code{background:#f2f2f2;padding:0 3px}
img.plot{display:block;margin:1em 0;max-width:100%}img.linked{max-width:100%}.note{color:#a33}"""


def write_html_report(output: Path, title: str, markdown: str, plots: list[BarChart] = (),
                      filename: str = "report.html") -> Path:
    """output/<filename>: the markdown's tables as HTML, then each plot as an embedded PNG (or one note
    saying matplotlib is missing). Returns the file's path."""
    body = [markdown_to_html(markdown)]
    if plots:
        if matplotlib_available():
            for chart in plots:
                data = base64.b64encode(render_png(chart)).decode("ascii")
                body.append(f'<img class="plot" alt="{html.escape(chart.title, quote=True)}" '
                            f'src="data:image/png;base64,{data}">')
        else:
            body.append(f'<p class="note">{html.escape(NO_MATPLOTLIB)}</p>')
    text = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>\n{STYLE}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
    path = Path(output) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
