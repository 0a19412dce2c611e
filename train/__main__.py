"""`python -m train ...` : the four-stage recipe (see train/recipe.py)."""

from train.recipe import cli_main

raise SystemExit(cli_main())
