"""The ``deadlift`` command group: global options, and every command registered.

Each command lives in the module of its concern (:mod:`deadlift.cli.server`,
:mod:`deadlift.cli.modules`, …); commands parse, call the library, and render.
"""

from __future__ import annotations

import click

from deadlift.cli import (
    cluster,
    contract,
    dev,
    dlq,
    events,
    guest,
    modules,
    monitor,
    offers,
    server,
    worker,
    workflows,
)
from deadlift.runtime.telemetry import configure_logging
from deadlift.settings import Settings, default_orgs_file


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deadlift", prog_name="deadlift", message="%(prog)s %(version)s")
@click.option(
    "--server",
    "-s",
    envvar="DEADLIFT_NATS_URL",
    default="nats://127.0.0.1:4222",
    show_default=True,
    help="NATS URL(s), comma-separated [env DEADLIFT_NATS_URL]",
)
@click.option(
    "--creds",
    envvar="DEADLIFT_CREDS",
    type=click.Path(dir_okay=False),
    help="NATS credentials file [env DEADLIFT_CREDS]",
)
@click.option("--user", envvar="DEADLIFT_USER", help="NATS user [env DEADLIFT_USER]")
@click.option(
    "--password", envvar="DEADLIFT_PASSWORD", help="NATS password [env DEADLIFT_PASSWORD]"
)
@click.option(
    "--org", envvar="DEADLIFT_ORG", help="act as this org (its credentials from the org manifest)"
)
@click.option(
    "--orgs",
    "orgs_file",
    envvar="DEADLIFT_ORGS_FILE",
    help="the org manifest [env DEADLIFT_ORGS_FILE; default: config/orgs.yaml in the "
    "nearest directory, from here up, that has one]",
)
@click.option("--log-level", envvar="DEADLIFT_LOG_LEVEL", default="INFO", show_default=True)
@click.option(
    "--log-format",
    envvar="DEADLIFT_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line with org/workflow/step/run and trace ids",
)
@click.pass_context
def main(
    ctx: click.Context,
    server: str,
    creds: str | None,
    user: str | None,
    password: str | None,
    org: str | None,
    orgs_file: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Deadlift: integrations as Wasm modules, run by workers on NATS JetStream."""
    try:
        settings = Settings(
            nats_url=server,
            creds=creds,
            user=user,
            password=password,
            org=org,
            orgs_file=orgs_file or default_orgs_file(),
            log_level=log_level.upper(),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    configure_logging(settings.log_level, log_format)
    ctx.obj = {"settings": settings}


for _module in (
    cluster,
    contract,
    dev,
    dlq,
    events,
    guest,
    modules,
    monitor,
    server,
    worker,
    workflows,
):
    for _command in _module.COMMANDS:
        main.add_command(_command)
# Offers are module commands: `deadlift module offer|offers|accept|keygen`.
for _command in offers.COMMANDS:
    modules.module.add_command(_command)


if __name__ == "__main__":
    main()
