"""The version of augflow: a leaf module, so recording it in a file imports nothing else of the package."""

__version__ = "0.1.0"
