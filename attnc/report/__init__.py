"""Reports: report.json, report.md, plots."""
