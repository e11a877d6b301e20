"""Entry point for ``python -m augflow``."""

from augflow.cli import main

main()
