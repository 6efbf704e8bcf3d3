"""``python -m bench.outage [--quick] [--markdown]``."""

from bench.outage import _cli

raise SystemExit(_cli())
