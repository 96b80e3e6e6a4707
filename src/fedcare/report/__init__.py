"""Reports: results.json, a readable HTML page, and the terminal table."""

from fedcare.report.html import write_results

__all__ = ["write_results"]
