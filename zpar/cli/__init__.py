"""Command line: ``zpar broker|agent|status|keygen|demo``, and ``zpar-broker``, ``zpar-agent``.

Flags map onto the frozen configs in config.py (defaults < ``--config`` file
< ``ZPAR_*`` variables < flags), then the daemon's ``run(config)`` takes over.

Exit codes: 0 done; 1 a runtime failure (an address in use, no broker
answering, credentials refused); 2 a usage or configuration error; 3 ``zpar
status --node NAME``: the broker answered, and that agent is not connected.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import typer

from .. import config as cfg
from ..errors import ConfigError, ZparError

if TYPE_CHECKING:
    from .. import security

app = typer.Typer(help="zpar: run Python functions on every core of a machine or a cluster.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None)

_CONFIG = typer.Option(None, "--config", help="TOML file with a [broker] or [agent] table.")
_HEARTBEAT = typer.Option(None, help="Seconds between heartbeats [default: 1.0; env ZPAR_HEARTBEAT].")
_LIVENESS = typer.Option(None, help="Heartbeats missed before a peer is dead [default: 3; env ZPAR_LIVENESS].")
_LOG_LEVEL = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING or ERROR [default: INFO].")
_LOG_FORMAT = typer.Option(None, "--log-format", help="text, or json: one object a line with task, node and "
                           "producer fields [default: text; env ZPAR_LOG_FORMAT].")
_PARENT = typer.Option(None, "--parent-pid", hidden=True, help="Exit when this process exits.")
_SECRET = typer.Option(None, "--secret", help="The cluster's shared secret. Other users can read a "
                       "command line: prefer --secret-file or ZPAR_SECRET [env ZPAR_SECRET].")
_SECRET_FILE = typer.Option(None, "--secret-file", help="File holding the shared secret (mode 600) "
                            "[env ZPAR_SECRET_FILE].")
_KEY_FILE = typer.Option(None, "--key-file", help="This node's NAME.key_secret from `zpar keygen --keys` "
                         "[env ZPAR_KEY_FILE].")


def _warn_argv_secret(secret: str | None) -> None:
    if secret is not None and "--secret" in sys.argv:
        logging.getLogger("zpar").warning(
            "--secret on the command line can be read by other users of this machine (ps, /proc); "
            "prefer --secret-file or ZPAR_SECRET")


def _setup_logging(level: str, fmt: str = "text") -> None:
    from .._logs import setup

    setup(level, fmt)


def _fail(exc: Exception, code: int) -> typer.Exit:
    """Say what went wrong on stderr; the exit to raise with ``code`` (2: a setting, 1: running)."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


def _load(cls: type[cfg.C], flags: dict[str, object], config_file: str | None) -> cfg.C:
    try:
        return cfg.load(cls, flags, os.environ, config_file)
    except ConfigError as exc:
        raise _fail(exc, 2) from None


def broker(
    frontend: Optional[str] = typer.Option(
        None, help=f"Address for producers [default: {cfg.DEFAULT_FRONTEND}; env ZPAR_FRONTEND]."),
    backend: Optional[str] = typer.Option(
        None, help=f"Address for agents [default: {cfg.DEFAULT_BACKEND}; env ZPAR_BACKEND]."),
    collector: Optional[str] = typer.Option(
        None, help=f"Address for results [default: {cfg.DEFAULT_COLLECTOR}; env ZPAR_COLLECTOR]."),
    heartbeat: Optional[float] = _HEARTBEAT,
    liveness: Optional[int] = _LIVENESS,
    insecure: Optional[bool] = typer.Option(
        None, "--insecure", help="No authentication at all: anyone who reaches the ports runs code as "
                                 "this user. Without it and without a secret, this user's own secret is used "
                                 "[env ZPAR_INSECURE]."),
    secret: Optional[str] = _SECRET,
    secret_file: Optional[str] = _SECRET_FILE,
    agent_secret_file: Optional[str] = typer.Option(
        None, "--agent-secret-file", help="A secret for agents alone (mode 600): then producers, who hold "
                                          "--secret-file's, cannot pose as agents, nor agents submit "
                                          "[env ZPAR_AGENT_SECRET_FILE; or ZPAR_AGENT_SECRET]."),
    key_file: Optional[str] = _KEY_FILE,
    allow_keys: Optional[str] = typer.Option(None, "--allow-keys", help="Directory of the producers' public "
                                             "NAME.key files to admit (with --key-file); removing one revokes it "
                                             "[env ZPAR_ALLOW_KEYS]."),
    allow_agent_keys: Optional[str] = typer.Option(None, "--allow-agent-keys", help="Directory of the agents' "
                                                   "public NAME.key files to admit (with --key-file) "
                                                   "[env ZPAR_ALLOW_AGENT_KEYS]."),
    allow_client_scale: Optional[bool] = typer.Option(
        None, "--allow-client-scale", help="With key files, let producers resize nodes (Client.scale, "
                                           "pp's set_ncpus), as the dashboard's token may; with a shared secret "
                                           "they always may [env ZPAR_ALLOW_CLIENT_SCALE]."),
    max_queued_tasks: Optional[int] = typer.Option(
        None, help="Tasks one producer may have queued (not yet given to an agent); past it its client holds "
                   "further tasks and sends them as results come back "
                   f"[default: {cfg.DEFAULT_MAX_QUEUED_TASKS}; env ZPAR_MAX_QUEUED_TASKS]."),
    max_queued_bytes: Optional[int] = typer.Option(
        None, help="Argument bytes of one producer's queued tasks (a task alone is taken whatever its size) "
                   f"[default: {cfg.DEFAULT_MAX_QUEUED_BYTES} (64 MiB); env ZPAR_MAX_QUEUED_BYTES]."),
    max_functions: Optional[int] = typer.Option(
        None, help="Function blobs kept for one producer while its tasks use them "
                   f"[default: {cfg.DEFAULT_MAX_FUNCTIONS}; env ZPAR_MAX_FUNCTIONS]."),
    max_function_bytes: Optional[int] = typer.Option(
        None, help="Bytes of those function blobs; a task whose blob alone is larger fails with "
                   f"zpar.QuotaExceeded [default: {cfg.DEFAULT_MAX_FUNCTION_BYTES} (64 MiB); "
                   "env ZPAR_MAX_FUNCTION_BYTES]."),
    max_objects: Optional[int] = typer.Option(
        None, help="Scattered objects (Client.scatter) kept for one producer until it lets them go "
                   f"[default: {cfg.DEFAULT_MAX_OBJECTS}; env ZPAR_MAX_OBJECTS]."),
    max_object_bytes: Optional[int] = typer.Option(
        None, help="Bytes of those objects; a scatter of a larger one fails with zpar.QuotaExceeded "
                   f"[default: {cfg.DEFAULT_MAX_OBJECT_BYTES} (1 GiB); env ZPAR_MAX_OBJECT_BYTES]."),
    max_producers_per_key: Optional[int] = typer.Option(
        None, help="Producers connected at once with one key (with a shared secret or this user's own: all of "
                   f"them) [default: {cfg.DEFAULT_MAX_PRODUCERS_PER_KEY}; env ZPAR_MAX_PRODUCERS_PER_KEY]."),
    dashboard: Optional[str] = typer.Option(
        None, help="HOST:PORT where the broker serves /api/status and /metrics (Prometheus) to holders of its "
                   "token (the link is in its log and in `zpar status`), or off "
                   f"[default: {cfg.DEFAULT_DASHBOARD}, another free port if taken; env ZPAR_DASHBOARD]."),
    announce: Optional[bool] = typer.Option(
        None, "--announce/--no-announce", help="Announce the broker on the LAN over mDNS (DNS-SD "
        "_zpar._tcp), for `zpar-agent --discover` and Client(discover=True); only when it listens on an "
        "address other than loopback [default: yes, unless --insecure; env ZPAR_ANNOUNCE=auto|on|off]."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="The cluster's name in that announcement [default: this host's name; "
                                "env ZPAR_CLUSTER]."),
    config_file: Optional[str] = _CONFIG,
    log_level: Optional[str] = _LOG_LEVEL,
    log_format: Optional[str] = _LOG_FORMAT,
    parent_pid: Optional[int] = _PARENT,
) -> None:
    """Run the broker: routes tasks from producers to agents and results back."""
    conf = _load(cfg.BrokerConfig, dict(frontend=frontend, backend=backend, collector=collector, heartbeat=heartbeat,
                                        liveness=liveness, insecure=insecure, log_level=log_level,
                                        parent_pid=parent_pid, secret=secret, secret_file=secret_file,
                                        agent_secret_file=agent_secret_file, key_file=key_file,
                                        allow_keys=allow_keys, allow_agent_keys=allow_agent_keys,
                                        allow_client_scale=allow_client_scale,
                                        max_queued_tasks=max_queued_tasks,
                                        max_queued_bytes=max_queued_bytes, max_functions=max_functions,
                                        max_function_bytes=max_function_bytes, max_objects=max_objects,
                                        max_object_bytes=max_object_bytes,
                                        max_producers_per_key=max_producers_per_key, dashboard=dashboard,
                                        log_format=log_format, cluster=cluster,
                                        announce=None if announce is None else "on" if announce else "off"),
                 config_file)
    _setup_logging(conf.log_level, conf.log_format)
    _warn_argv_secret(secret)
    if conf.insecure and not conf.secured:
        logging.getLogger("zpar_broker").warning(
            "--insecure: no authentication; anyone who reaches these ports, other accounts of this machine "
            "included, can run code as this user")
    from zpar_broker.server import run  # the broker package is imported only here

    try:
        raise typer.Exit(run(conf))
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except OSError as exc:
        raise _fail(exc, 1) from None


def agent(
    broker: Optional[str] = typer.Option(
        None, help=f"The broker's backend address [default: {cfg.DEFAULT_BACKEND}; env ZPAR_BROKER]."),
    workers: Optional[int] = typer.Option(
        None, help="Worker processes [default: one per usable core; env ZPAR_WORKERS]."),
    name: Optional[str] = typer.Option(None, help="Node name shown in status [default: host:pid]."),
    max_tasks_per_worker: Optional[int] = typer.Option(
        None, help="Recycle a worker after this many tasks [default: 0, never; env ZPAR_MAX_TASKS_PER_WORKER]."),
    max_memory_per_worker: Optional[int] = typer.Option(
        None, help="Recycle a worker, between tasks, once its RSS passes this many MiB; a task that takes "
                   "it past 1.5 times that is stopped [default: 0, no limit; env ZPAR_MAX_MEMORY_PER_WORKER]."),
    grace: Optional[float] = typer.Option(
        None, help="Seconds the first SIGTERM gives running tasks before the agent stops; a second "
                   "signal stops it at once [default: 30; env ZPAR_GRACE]."),
    secret: Optional[str] = _SECRET,
    secret_file: Optional[str] = _SECRET_FILE,
    key_file: Optional[str] = _KEY_FILE,
    broker_key: Optional[str] = typer.Option(None, "--broker-key", help="The broker's public broker.key (with "
                                             "--key-file) [env ZPAR_BROKER_KEY]."),
    insecure: Optional[bool] = typer.Option(
        None, "--insecure", help="Plaintext, no credentials, to a broker run --insecure (a machine and network "
                                 "you fully trust only). Without it and without a secret, this user's own "
                                 "secret is used [env ZPAR_INSECURE]."),
    heartbeat: Optional[float] = _HEARTBEAT,
    liveness: Optional[int] = _LIVENESS,
    discover: Optional[bool] = typer.Option(
        None, "--discover", help="Find the broker on the LAN (mDNS) instead of --broker: the one whose "
                                 "announced key is the one our credentials expect; CurveZMQ then "
                                 "authenticates it as ever [env ZPAR_DISCOVER]."),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="With --discover: the broker of this cluster (needed when several answer) "
                                "[env ZPAR_CLUSTER]."),
    discover_timeout: Optional[float] = typer.Option(
        None, "--discover-timeout", help="Seconds --discover looks [default: 10; env ZPAR_DISCOVER_TIMEOUT]."),
    resources: Optional[str] = typer.Option(
        None, "--resources", help="What this node offers tasks that ask for resources "
                                  "(client.options(resources={'gpu': 1})), as NAME=AMOUNT pairs: gpu=2,memory=64GiB "
                                  "(sizes in KiB, MiB, GiB or KB, MB, GB) [default: none; env ZPAR_RESOURCES]."),
    config_file: Optional[str] = _CONFIG,
    log_level: Optional[str] = _LOG_LEVEL,
    log_format: Optional[str] = _LOG_FORMAT,
    parent_pid: Optional[int] = _PARENT,
) -> None:
    """Run a node agent: keeps one worker per core busy with the broker's tasks."""
    conf = _load(cfg.AgentConfig, dict(broker=broker, workers=workers, name=name, heartbeat=heartbeat,
                                       liveness=liveness, log_level=log_level, parent_pid=parent_pid,
                                       max_tasks_per_worker=max_tasks_per_worker,
                                       max_memory_per_worker=max_memory_per_worker, grace=grace, secret=secret,
                                       secret_file=secret_file, key_file=key_file, broker_key=broker_key,
                                       insecure=insecure, log_format=log_format, discover=discover,
                                       cluster=cluster, discover_timeout=discover_timeout, resources=resources),
                 config_file)
    _setup_logging(conf.log_level, conf.log_format)
    _warn_argv_secret(secret)
    if conf.discover:
        conf = _discovered(conf)
    if conf.insecure and not conf.secured:
        logging.getLogger("zpar.agent").warning(
            "--insecure: plaintext to %s; whoever reaches it can read the tasks or pose as the broker", conf.broker)
    from ..agent.server import run

    try:
        raise typer.Exit(run(conf))
    except ConfigError as exc:
        raise _fail(exc, 2) from None


def _discovered(conf: cfg.AgentConfig) -> cfg.AgentConfig:
    """``conf`` with the broker found on the LAN; exit saying why if none is (1), or several are (2)."""
    import dataclasses

    from .. import _discovery, security

    if conf.broker != cfg.DEFAULT_BACKEND:
        raise _fail(ConfigError(f"give the broker's address ({conf.broker}) or --discover, not both"), 2)
    try:
        creds = security.client_credentials("agent", secret=conf.secret, secret_file=conf.secret_file,
                                            key_file=conf.key_file, broker_key=conf.broker_key,
                                            insecure=conf.insecure)
        found = _discovery.find("agent", creds, conf.cluster, conf.discover_timeout)
    except ConfigError as exc:
        raise _fail(exc, 2) from None
    except ZparError as exc:
        raise _fail(exc, 1) from None
    broker = found.address("agent", _discovery.local_networks())
    logging.getLogger("zpar.agent").info("joining %s: %s (the CurveZMQ handshake still proves it holds the "
                                         "key it announced)", found.describe(), broker)
    return dataclasses.replace(conf, broker=broker)


# The options of the commands that ask a running broker (status, tasks).
_ASK_ADDRESS = typer.Option(cfg.DEFAULT_FRONTEND, envvar="ZPAR_ADDRESS", help="The broker's frontend address.")
_ASK_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
_ASK_TIMEOUT = typer.Option(5.0, help="Seconds to wait for the broker.")
_ASK_BROKER_KEY = typer.Option(None, "--broker-key", help="The broker's public broker.key [env ZPAR_BROKER_KEY].")
_ASK_INSECURE = typer.Option(False, "--insecure", envvar="ZPAR_INSECURE",
                             help="Ask a broker run --insecure, with no credentials.")


def _ask(broker: str, timeout: float, secret: str | None, secret_file: str | None, key_file: str | None,
         broker_key: str | None, insecure: bool,
         request: dict[str, Any] | None = None) -> tuple[security.Credentials | None, dict[str, Any]]:
    """``(credentials, the broker's answer)`` to a STATUS (with ``request``); exit 1 saying why if none."""
    from ..client import _credentials, broker_status

    _warn_argv_secret(secret)
    try:
        creds = _credentials(secret, secret_file, key_file, broker_key, insecure, broker)
        return creds, broker_status(broker, timeout, creds, insecure=insecure, request=request)
    except ZparError as exc:
        raise _fail(exc, 1) from None


@app.command()
def status(
    broker: str = _ASK_ADDRESS,
    as_json: bool = _ASK_JSON,
    timeout: float = _ASK_TIMEOUT,
    secret: Optional[str] = _SECRET,
    secret_file: Optional[str] = _SECRET_FILE,
    key_file: Optional[str] = _KEY_FILE,
    broker_key: Optional[str] = _ASK_BROKER_KEY,
    insecure: bool = _ASK_INSECURE,
    watch: float = typer.Option(0.0, "--watch", help="Redraw the table in place every this many seconds, "
                                "until Ctrl-C (0: print it once)."),
    node: Optional[str] = typer.Option(None, "--node", help="Exit 3 unless the broker lists this agent (its "
                                       "--name) as connected: a health probe for an agent (exit 1 means no "
                                       "broker answered)."),
) -> None:
    """Show the cluster: nodes, workers busy and idle, queued, running and done tasks."""
    creds, info = _ask(broker, timeout, secret, secret_file, key_file, broker_key, insecure)
    nodes = info.get("nodes")
    if node is not None and not any(isinstance(n, dict) and n.get("name") == node
                                    for n in (nodes if isinstance(nodes, list) else [])):
        from .._text import printable

        typer.echo(f"error: the broker at {broker} answered, and no agent named {printable(node)} is connected "
                   "to it; is that agent running with that --name?", err=True)
        raise typer.Exit(3)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    from ._status import render, view

    if watch <= 0:
        render(info, broker)
        return
    from rich.live import Live
    from rich.text import Text

    try:
        with Live(view(info, broker), auto_refresh=False) as live:
            while True:
                time.sleep(watch)
                try:
                    from ..client import broker_status

                    live.update(view(broker_status(broker, timeout, creds, insecure=insecure), broker), refresh=True)
                except ZparError as exc:  # the broker went away: say so in place, and keep asking
                    live.update(Text(f"{broker}: {exc}", style="yellow"), refresh=True)
    except KeyboardInterrupt:
        return


@app.command()
def tasks(
    broker: str = _ASK_ADDRESS,
    failed: bool = typer.Option(False, "--failed", help="Only the tasks that did not end well."),
    limit: int = typer.Option(50, help="How many, newest first (the broker keeps the last 10,000)."),
    as_json: bool = _ASK_JSON,
    timeout: float = _ASK_TIMEOUT,
    secret: Optional[str] = _SECRET,
    secret_file: Optional[str] = _SECRET_FILE,
    key_file: Optional[str] = _KEY_FILE,
    broker_key: Optional[str] = _ASK_BROKER_KEY,
    insecure: bool = _ASK_INSECURE,
) -> None:
    """The latest tasks that ended: when, which producer and function, where, how, how long, and why not."""
    _, info = _ask(broker, timeout, secret, secret_file, key_file, broker_key, insecure,
                   {"tasks": {"limit": limit, "failed": failed}})
    if "tasks" not in info:
        raise _fail(ZparError(info.get("tasks_refused") or "this broker keeps no task history; upgrade it"), 1)
    if as_json:
        typer.echo(json.dumps(info["tasks"], indent=2))
        return
    from ._status import render_tasks

    render_tasks(info["tasks"])


@app.command()
def demo(
    workers: Optional[int] = typer.Option(None, help="Workers in the embedded cluster [default: one per core]."),
    jobs: int = typer.Option(32, help="How many sums of primes to compute."),
    size: int = typer.Option(100_000, help="The smallest N; job i sums the primes below N + 1000 i."),
) -> None:
    """Sum of primes below N for many N, serially and on every core: the speed-up zpar gives."""
    from .demo import run_demo

    raise typer.Exit(run_demo(workers=workers, jobs=jobs, size=size))


@app.command()
def keygen(
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the secret into this new file, mode 600 "
                                      "from the start (never overwrites) [default: print it]."),
    keys: Optional[str] = typer.Option(None, "--keys", help="Write a keypair into this directory instead: "
                                       "NAME.key (public) and NAME.key_secret (mode 600)."),
    name: str = typer.Option("", "--name", help="The keypair's name with --keys [default: this host's name]."),
) -> None:
    """Make a strong random shared secret (with its own salt), or a node's keypair files with --keys.

    A secret: `zpar keygen --out secret`, copied to every node and producer
    (one line, `zpar-secret-v1:<salt>:<secret>`; it works as ZPAR_SECRET too).
    Key files: one `zpar keygen --keys DIR --name NODE` per node and one named
    broker; put the nodes' NODE.key files in the broker's --allow-keys
    directory and give each node broker.key.
    """
    from .. import security

    try:
        if keys is not None:
            import socket

            public, secret_path = security.make_keypair_files(keys, name or socket.gethostname())
            typer.echo(f"public key {public} (share it), secret key {secret_path} (keep it on this node)")
        elif out is not None:
            security.write_secret_file(out)
            typer.echo(f"wrote a new secret to {out} (mode 600); give the same file to the broker, agents "
                       "and producers", err=True)
        else:
            typer.echo(security.generate_secret())
    except ConfigError as exc:
        raise _fail(exc, 2) from None


app.command("broker")(broker)
app.command("agent")(agent)


def _single(command: Callable[..., None]) -> typer.Typer:
    one = typer.Typer(add_completion=False, rich_markup_mode=None)
    one.command()(command)
    return one


def main() -> None:
    app()


def broker_main() -> None:
    _single(broker)()


def agent_main() -> None:
    _single(agent)()
