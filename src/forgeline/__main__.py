"""``python -m forgeline``."""

from forgeline.cli import main

main()
