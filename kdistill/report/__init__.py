"""Reports, written from run directories alone.

``write_report(run_dir)`` (:mod:`kdistill.report.run_report`) turns a finished ``kdistill run``
into ``report.md`` and a self-contained ``report.html`` (the same content, images embedded
as data URIs, no external asset and no script), with figures in ``figures/``
(``curves.png`` stays at the top), and ``summary.csv`` (one row per model).
``write_comparison(run_dirs)`` (:mod:`kdistill.report.compare`) puts several runs
(methods, temperatures, seeds) side by side in one report.

Both documents are rendered from one list of typed blocks (:mod:`kdistill.report.document`:
headings, paragraphs, notes, tables, figures), so the Markdown and the HTML always say the
same thing; the plots are in :mod:`kdistill.report.figures`. A sweep's leaderboard is
written by :mod:`kdistill.report.leaderboard` with the same documents and figures.
"""

from kdistill.report.compare import write_comparison
from kdistill.report.figures import pareto_front
from kdistill.report.run_report import headline, load_run, write_report

__all__ = ["headline", "load_run", "pareto_front", "write_comparison", "write_report"]
