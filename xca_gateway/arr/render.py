"""Server-side rendering helpers of the review UI: charts, CSV, PDF (sans-IO).

Charts are computed here as plain data (:class:`Chart`: bars, lines, labels with their
coordinates); the page templates draw them as inline SVG with presentation attributes only (no
JavaScript, nothing fetched from a CDN), so that the page's Content-Security-Policy can forbid
inline styles and scripts, and Jinja2 escapes every label.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Colour-blind-safe palette (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
SUCCESS = "#009E73"
FAILURE = "#D55E00"


def pick_bucket(since: datetime, until: datetime, target: int = 60) -> int:
    """A round bucket size (seconds) giving about ``target`` bars over the range."""
    span = max(1.0, (until - since).total_seconds())
    for size in (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400):
        if span / size <= target:
            return size
    return 30 * 86400


def _label(value: datetime, bucket: int) -> str:
    return value.strftime("%Y-%m-%d" if bucket >= 86400 else "%m-%d %H:%M")


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    # (bucket start, count), any order; missing buckets count as zero.
    points: Sequence[tuple[datetime, int]]


def _buckets(since: datetime, until: datetime, bucket: int) -> list[datetime]:
    start = datetime.fromtimestamp(int(since.timestamp()) // bucket * bucket, UTC)
    out: list[datetime] = []
    current = start
    while current <= until and len(out) < 2000:
        out.append(current)
        current += timedelta(seconds=bucket)
    return out


@dataclass(frozen=True)
class Bar:
    x: str
    y: str
    w: str
    h: str
    color: str
    tip: str


@dataclass(frozen=True)
class Segment:
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class Label:
    x: str
    y: str
    text: str
    size: str = "10"
    fill: str = "#444"
    anchor: str | None = None


@dataclass(frozen=True)
class Swatch:
    x: str
    y: str
    color: str


@dataclass(frozen=True)
class Polyline:
    points: str
    color: str
    tip: str


@dataclass(frozen=True)
class Chart:
    """An SVG chart as data; the page template draws it (escaping every text)."""

    chart_id: str
    title: str
    width: int
    height: int
    # What the chart shows in all: a tile beside it can say the same number.
    total: int
    lines: tuple[Segment, ...] = ()
    bars: tuple[Bar, ...] = ()
    polylines: tuple[Polyline, ...] = ()
    swatches: tuple[Swatch, ...] = ()
    texts: tuple[Label, ...] = ()


def bar_chart(
    series: Sequence[Series],
    *,
    since: datetime,
    until: datetime,
    bucket: int,
    title: str,
    width: int = 900,
    height: int = 180,
    chart_id: str = "chart",
) -> Chart:
    """Stacked bars over time with a legend; each bar has a tooltip."""
    slots = _buckets(since, until, bucket)
    index = {s: i for i, s in enumerate(slots)}
    stacks = [[0] * len(series) for _ in slots]
    for n, s in enumerate(series):
        for when, count in s.points:
            i = index.get(when)
            if i is not None:
                stacks[i][n] += count
    total = sum(sum(col) for col in stacks)
    peak = max((sum(col) for col in stacks), default=0) or 1
    left, bottom, top = 44, 22, 18
    plot_w, plot_h = width - left - 8, height - bottom - top
    bar_w = plot_w / max(1, len(slots))
    texts = [
        Label(str(left - 4), str(top + 8), str(peak), anchor="end"),
        Label(str(left - 4), str(top + plot_h), "0", anchor="end"),
    ]
    bars: list[Bar] = []
    for i, (slot, col) in enumerate(zip(slots, stacks, strict=True)):
        y = float(top + plot_h)
        for n, count in enumerate(col):
            if not count:
                continue
            h = count / peak * plot_h
            y -= h
            bars.append(
                Bar(
                    f"{left + i * bar_w + 0.5:.1f}",
                    f"{y:.1f}",
                    f"{max(1.0, bar_w - 1):.1f}",
                    f"{h:.1f}",
                    series[n].color,
                    f"{_label(slot, bucket)}: {count} {series[n].name}",
                )
            )
    if slots:
        texts.append(Label(str(left), str(height - 6), _label(slots[0], bucket)))
        texts.append(
            Label(str(width - 8), str(height - 6), _label(slots[-1], bucket), anchor="end")
        )
    swatches: list[Swatch] = []
    x = left
    for s in series:
        swatches.append(Swatch(str(x), "4", s.color))
        texts.append(Label(str(x + 14), "13", s.name, size="11", fill="#222"))
        x += 24 + 7 * len(s.name)
    return Chart(
        chart_id,
        title,
        width,
        height,
        total,
        lines=(Segment(left, top + plot_h, width - 8, top + plot_h),),
        bars=tuple(bars),
        swatches=tuple(swatches),
        texts=tuple(texts),
    )


def line_chart(
    series: Sequence[Series],
    *,
    since: datetime,
    until: datetime,
    bucket: int,
    title: str,
    width: int = 900,
    height: int = 200,
    chart_id: str = "lines",
) -> Chart:
    """One polyline per series (e.g. per peer) over time, with a legend."""
    slots = _buckets(since, until, bucket)
    index = {s: i for i, s in enumerate(slots)}
    values = []
    for s in series:
        row = [0] * len(slots)
        for when, count in s.points:
            i = index.get(when)
            if i is not None:
                row[i] += count
        values.append(row)
    total = sum(sum(r) for r in values)
    peak = max((max(r) for r in values if r), default=0) or 1
    left, bottom, top = 44, 22, 18 + 14 * ((len(series) + 3) // 4)
    plot_w, plot_h = width - left - 8, height - bottom - top
    step = plot_w / max(1, len(slots) - 1)
    texts = [Label(str(left - 4), str(top + 8), str(peak), anchor="end")]
    polylines = []
    for s, row in zip(series, values, strict=True):
        points = " ".join(
            f"{left + i * step:.1f},{top + plot_h - v / peak * plot_h:.1f}"
            for i, v in enumerate(row)
        )
        polylines.append(Polyline(points, s.color, f"{s.name}: {sum(row)}"))
    swatches = []
    for n, s in enumerate(series):
        x = left + (n % 4) * (plot_w / 4)
        y = 4 + 14 * (n // 4)
        swatches.append(Swatch(f"{x:.0f}", str(y), s.color))
        label = s.name if len(s.name) <= 40 else s.name[:37] + "..."
        texts.append(Label(f"{x + 14:.0f}", str(y + 9), label, size="11", fill="#222"))
    if slots:
        texts.append(Label(str(left), str(height - 6), _label(slots[0], bucket)))
        texts.append(
            Label(str(width - 8), str(height - 6), _label(slots[-1], bucket), anchor="end")
        )
    return Chart(
        chart_id,
        title,
        width,
        height,
        total,
        lines=(Segment(left, top + plot_h, width - 8, top + plot_h),),
        polylines=tuple(polylines),
        swatches=tuple(swatches),
        texts=tuple(texts),
    )


# --------------------------------------------------------------------------- CSV


def _csv_safe(value: object) -> str:
    """A cell a spreadsheet will not run as a formula (CSV injection)."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def to_csv(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_safe(v) for v in row])
    # A BOM so that spreadsheet programs read UTF-8.
    return b"\xef\xbb\xbf" + out.getvalue().encode("utf-8")


# --------------------------------------------------------------------------- PDF


def _latin1(value: object) -> str:
    text = "" if value is None else str(value)
    return text.encode("latin-1", "replace").decode("latin-1")


@dataclass(frozen=True)
class PdfTable:
    header: Sequence[str]
    widths: Sequence[float]
    rows: Sequence[Sequence[object]]


def report_pdf(
    *,
    title: str,
    subtitle_lines: Sequence[str],
    chart: Sequence[Series],
    since: datetime,
    until: datetime,
    bucket: int,
    table: PdfTable,
    footer: str,
) -> bytes:
    """A landscape A4 report: title, summary lines, a stacked bar chart, and a table."""
    from fpdf import FPDF

    pdf = FPDF(orientation="L", unit="mm", format="A4")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_title(_latin1(title))
    pdf.set_creator("xca-gateway audit record repository")
    pdf.alias_nb_pages()
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.cell(0, 9, _latin1(title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    for line in subtitle_lines:
        pdf.cell(0, 5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    _pdf_chart(pdf, chart, since, until, bucket)
    pdf.ln(3)
    _pdf_table(pdf, table)
    pdf.set_y(-10)
    pdf.set_font("Helvetica", "I", 7)
    pdf.cell(0, 4, _latin1(footer))
    return bytes(pdf.output())


def _pdf_chart(
    pdf: object, series: Sequence[Series], since: datetime, until: datetime, bucket: int
) -> None:
    from fpdf import FPDF

    assert isinstance(pdf, FPDF)
    slots = _buckets(since, until, bucket)
    index = {s: i for i, s in enumerate(slots)}
    stacks = [[0] * len(series) for _ in slots]
    for n, s in enumerate(series):
        for when, count in s.points:
            i = index.get(when)
            if i is not None:
                stacks[i][n] += count
    peak = max((sum(c) for c in stacks), default=0) or 1
    x0, y0 = pdf.get_x() + 10, pdf.get_y()
    w, h = 257.0, 40.0
    pdf.set_draw_color(136, 136, 136)
    pdf.line(x0, y0 + h, x0 + w, y0 + h)
    pdf.set_font("Helvetica", "", 7)
    pdf.text(x0 - 9, y0 + 3, str(peak))
    pdf.text(x0 - 4, y0 + h, "0")
    bar_w = w / max(1, len(slots))
    for i, col in enumerate(stacks):
        y = y0 + h
        for n, count in enumerate(col):
            if not count:
                continue
            bh = count / peak * h
            y -= bh
            color = series[n].color.lstrip("#")
            pdf.set_fill_color(int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16))
            pdf.rect(x0 + i * bar_w, y, max(0.3, bar_w * 0.85), bh, style="F")
    if slots:
        pdf.text(x0, y0 + h + 4, _latin1(_label(slots[0], bucket)))
        pdf.text(x0 + w - 20, y0 + h + 4, _latin1(_label(slots[-1], bucket)))
    lx = x0
    for s in series:
        color = s.color.lstrip("#")
        pdf.set_fill_color(int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16))
        pdf.rect(lx, y0 + h + 6, 3, 3, style="F")
        pdf.text(lx + 4, y0 + h + 8.5, _latin1(s.name))
        lx += 8 + 2 * len(s.name)
    pdf.set_y(y0 + h + 11)


def _pdf_table(pdf: object, table: PdfTable) -> None:
    from fpdf import FPDF

    assert isinstance(pdf, FPDF)

    def header() -> None:
        pdf.set_font("Helvetica", "B", 7.5)
        pdf.set_fill_color(230, 230, 230)
        for name, width in zip(table.header, table.widths, strict=True):
            pdf.cell(width, 5, _latin1(name), border=1, fill=True)
        pdf.ln()
        pdf.set_font("Helvetica", "", 7)

    header()
    for row in table.rows:
        if pdf.get_y() > pdf.h - 20:
            pdf.add_page()
            header()
        for value, width in zip(row, table.widths, strict=True):
            text = _latin1(value)
            # Cut to the column (no wrapping keeps one event per line).
            while text and pdf.get_string_width(text) > width - 1.5:
                text = text[:-1]
            pdf.cell(width, 4.5, text, border=1)
        pdf.ln()
