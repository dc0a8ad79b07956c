"""``python -m deadlift.cli``."""

from deadlift.cli.app import main

main()
