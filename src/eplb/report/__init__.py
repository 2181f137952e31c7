"""Report: one self-contained HTML page and a markdown page with PNGs, from plans and simulation results.

- ``compare_section(load, ...)``: every algorithm's plan of a recorded load (per-layer bars, per-GPU heatmaps);
- ``simulation_sections(results)``: replay timelines, balance against moves, step time per dispatch and
  waterfill setting;
- ``write_report(out_dir, sections)``: ``report.html``, ``report.md`` and the PNG files.

Plots use matplotlib (``pip install 'eplb[report]'``), imported on first use.
"""

from eplb.report.pages import Section, Table, compare_section, simulation_sections, write_report

__all__ = ["Section", "Table", "compare_section", "simulation_sections", "write_report"]
