"""`python -m ragft` is the `ragft` console script."""

from ragft.cli import main

main()
