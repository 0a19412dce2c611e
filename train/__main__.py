"""`python -m train ...` : the four-stage recipe (see train/recipe.py)."""

from train.recipe import main

raise SystemExit(main())
