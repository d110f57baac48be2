"""Reviewing results: the Markdown report, the offline plots page, the worst cases."""
