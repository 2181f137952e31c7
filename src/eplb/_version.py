"""eplb's version, in a leaf module: the file writers record it without importing the ``eplb`` package
(which would be an upward import). Keep it equal to ``version`` in pyproject.toml."""

__version__ = "0.1.0"
