"""A report as data (title, settings, sections of text, tables and figures), rendered to one
self-contained HTML file (figures as inline SVG: the file works offline, alone) and to Markdown
(figures as SVG files beside it)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from slimport.errors import SlimportError


@dataclass
class Table:
    columns: list[str]
    rows: list[list]
    caption: str = ""


@dataclass
class Figure:
    svg: str  # a complete <svg> document (see slimport.report.plots)
    caption: str
    name: str  # file stem for the Markdown twin's image


@dataclass
class Report:
    title: str
    settings: dict = field(default_factory=dict)
    parts: list[tuple[str, object]] = field(default_factory=list)  # (heading, Table|Figure|str)

    def add(self, heading: str, item: Table | Figure | str) -> Report:
        self.parts.append((heading, item))
        return self

    def html(self) -> str:
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(self.title)}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>{_e(self.title)}</h1>",
        ]
        if self.settings:
            out.append(
                _html_table(Table(["setting", "value"], list(map(list, self.settings.items()))))
            )
        for heading, item in self.parts:
            if heading:
                out.append(f"<h2>{_e(heading)}</h2>")
            if isinstance(item, Table):
                out.append(_html_table(item))
            elif isinstance(item, Figure):
                svg = item.svg[item.svg.find("<svg") :]  # drop the XML prolog inside HTML
                out.append(f'<figure class="plot" id="fig-{_e(item.name)}">{svg}')
                out.append(f"<figcaption>{_e(item.caption)}</figcaption></figure>")
            else:
                out.append(f"<p>{_e(str(item))}</p>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def markdown(self, figure_dir: str | None = None) -> str:
        lines = [f"# {self.title}", ""]
        if self.settings:
            lines += _md_table(Table(["setting", "value"], list(map(list, self.settings.items()))))
        for heading, item in self.parts:
            if heading:
                lines += [f"## {heading}", ""]
            if isinstance(item, Table):
                lines += _md_table(item)
            elif isinstance(item, Figure):
                target = f"{figure_dir}/{item.name}.svg" if figure_dir else f"{item.name}.svg"
                lines += [f"![{item.caption}]({target})", ""]
            else:
                lines += [str(item), ""]
        return "\n".join(lines)

    def save(self, path: str | Path) -> list[Path]:
        """Write PATH (.html) and its Markdown twin PATH.md (figures in PATH_files/); the
        written paths. Atomic per file: a reader never sees half a report."""
        from slimport.io.base import atomic_path

        path = Path(path)
        if path.is_dir():
            raise SlimportError(f"--report {path}: is a folder; give a file name (report.html)")
        if not path.parent.is_dir():
            raise SlimportError(f"--report {path}: folder {path.parent} does not exist")
        stem = path.with_suffix("") if path.suffix.lower() in (".html", ".htm") else path
        md, figs = Path(f"{stem}.md"), Path(f"{stem}_files")
        written = [path, md]
        figures = [i for _, i in self.parts if isinstance(i, Figure)]
        if figures:
            figs.mkdir(exist_ok=True)
        for f in figures:
            with atomic_path(figs / f"{f.name}.svg") as tmp:
                tmp.write_text(f.svg)
            written.append(figs / f"{f.name}.svg")
        with atomic_path(path) as tmp:
            tmp.write_text(self.html())
        with atomic_path(md) as tmp:
            tmp.write_text(self.markdown(figs.name))
        return written


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in t.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_cell(v))}</td>" for v in row) + "</tr>" for row in t.rows
    )
    cap = f"<caption>{_e(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md(v: object) -> str:
    return re.sub(r"[|\n]", lambda m: "\\|" if m.group() == "|" else " ", _cell(v))


def _md_table(t: Table) -> list[str]:
    lines = [f"*{t.caption}*", ""] if t.caption else []
    lines += ["| " + " | ".join(map(_md, t.columns)) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(_md(v) for v in row) + " |" for row in t.rows]
    return lines + [""]


CSS = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.25em .6em;"
    "text-align:left}th{background:#eee}caption{text-align:left;font-style:italic}"
    "figure.plot svg{max-width:100%;height:auto}"
)
