"""`python -m mistralrs_jax.cli`: the same as `mistralrs-server`."""
import sys

from . import main

sys.exit(main())
