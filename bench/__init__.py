"""``python -m bench``: reflow-supervisor's numbers next to their baselines, measured in one run.

See ``bench/__main__.py`` for the command line and issue 8 for the targets.
"""
