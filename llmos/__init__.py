"""llmos: a large language model's whole life in one person's hands."""

__version__ = "0.1.0"
