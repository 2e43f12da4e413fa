"""Reports of a run: one self-contained HTML file (plots inline) and its Markdown twin.

Commands build a `Report` of sections (text, tables, figures) and `save` it; the plots come from
`slimport.report.plots` (matplotlib, the optional extra `report`, imported only when a plot is
drawn)."""

from slimport.report.document import Figure, Report, Table

__all__ = ["Figure", "Report", "Table"]
