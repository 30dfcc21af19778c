"""Console commands (``megan-fast ...``)."""
