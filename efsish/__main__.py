"""`python -m efsish`: the same entry point as the `efsish` console script."""

from efsish.cli import main

raise SystemExit(main())
