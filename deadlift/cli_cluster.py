"""CLI commands for running beyond one machine (a local NATS cluster)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
