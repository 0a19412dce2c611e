"""`python -m train ...` : the four-stage recipe (see train/recipe.py)."""

import os

# libgomp (torch's CPU threads) spins ~300k iterations at every barrier before sleeping: free on idle cores, a
# collapse when another job holds one of them (bench/threads.py measured 2-thread training 8x slower than PASSIVE
# beside other work). PASSIVE sleeps at once. It must be set before torch loads libgomp; OMP_WAIT_POLICY=ACTIVE
# in the environment keeps the spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from train.recipe import cli_main  # noqa: E402

raise SystemExit(cli_main())
