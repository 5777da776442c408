"""The broker's per-producer quotas as settings: flags, ``ZPAR_*`` variables, the TOML file, and a real broker.

``BrokerConfig.max_queued_tasks``, ``max_queued_bytes``, ``max_functions`` and
``max_function_bytes`` become ``zpar_broker.limits.Limits`` in the broker's
server; their defaults are Limits' own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tasks

from zpar import config
from zpar.config import BrokerConfig
from zpar.errors import ConfigError
from zpar.testing import wait_for
from zpar_broker.limits import Limits

SETTINGS = {  # BrokerConfig field -> Limits field
    "max_queued_tasks": "queued_tasks",
    "max_queued_bytes": "queued_bytes",
    "max_functions": "functions",
    "max_function_bytes": "function_bytes",
    "max_objects": "objects",
    "max_object_bytes": "object_bytes",
}
BROKER = os.path.join(os.path.dirname(sys.executable), "zpar-broker")


def _toml(tmp_path, body: str):
    path = tmp_path / "zpar.toml"
    path.write_text(f"[broker]\n{body}\n")
    return path


# ---------------------------------------------------------------------- defaults and sources


def test_the_defaults_are_the_brokers_limits():
    conf = BrokerConfig()
    assert {lim: getattr(conf, name) for name, lim in SETTINGS.items()} == {
        lim: getattr(Limits(), lim) for lim in SETTINGS.values()}


@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_is_read_from_a_flag_a_variable_and_the_file(tmp_path, name):
    assert getattr(config.load(BrokerConfig, {name: 7}, {}), name) == 7
    assert getattr(config.load(BrokerConfig, {}, {f"ZPAR_{name.upper()}": "8"}), name) == 8
    assert getattr(config.load(BrokerConfig, {}, {}, _toml(tmp_path, f"{name} = 9")), name) == 9
    dashed = _toml(tmp_path, f"{name.replace('_', '-')} = 10")  # the file takes the flag's spelling too
    assert getattr(config.load(BrokerConfig, {}, {}, dashed), name) == 10


def test_flags_beat_variables_which_beat_the_file(tmp_path):
    toml = _toml(tmp_path, "max_queued_tasks = 1\nmax_queued_bytes = 1\nmax_functions = 1")
    env = {"ZPAR_MAX_QUEUED_TASKS": "2", "ZPAR_MAX_QUEUED_BYTES": "2"}
    conf = config.load(BrokerConfig, {"max_queued_tasks": 3, "max_queued_bytes": None}, env, toml)
    assert (conf.max_queued_tasks, conf.max_queued_bytes, conf.max_functions) == (3, 2, 1)
    assert conf.max_function_bytes == config.DEFAULT_MAX_FUNCTION_BYTES  # unset anywhere: the default


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("value", [0, -1])
def test_a_count_below_one_is_refused_naming_the_setting(name, value):
    dashed = name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{dashed} must be a positive integer, not {value}"):
        config.load(BrokerConfig, {name: value}, {})
    with pytest.raises(ConfigError, match=f"{dashed} must be a positive integer"):
        config.load(BrokerConfig, {}, {f"ZPAR_{name.upper()}": str(value)})
    with pytest.raises(ConfigError, match=dashed):
        BrokerConfig(**{name: value})


@pytest.mark.parametrize("name", SETTINGS)
def test_a_variable_that_is_not_an_integer_is_refused_naming_it(name):
    for raw in ("lots", "1.5", "1G"):
        with pytest.raises(ConfigError, match=f"ZPAR_{name.upper()}='{raw}' is not a valid int"):
            config.load(BrokerConfig, {}, {f"ZPAR_{name.upper()}": raw})


@pytest.mark.parametrize(("body", "match"), [
    ("max_queued_tasks = 1.5", "max-queued-tasks must be a positive integer, not 1.5"),
    ("max_queued_bytes = true", "max-queued-bytes must be a positive integer, not True"),
    ("max_functions = 0", "max-functions must be a positive integer, not 0"),
    ('max_function_bytes = "lots"', "max_function_bytes='lots' is not a valid int"),
    ("max_function_bytes = [1]", r"max-function-bytes must be a positive integer, not \[1\]"),
])
def test_a_file_value_that_is_not_a_positive_integer_is_refused_naming_it(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        config.load(BrokerConfig, {}, {}, _toml(tmp_path, body))


def test_a_string_of_digits_in_the_file_is_read_as_an_integer(tmp_path):
    assert config.load(BrokerConfig, {}, {}, _toml(tmp_path, 'max_queued_tasks = "12"')).max_queued_tasks == 12


# ---------------------------------------------------------------------- the command line


def test_the_broker_refuses_a_zero_quota_with_exit_2_naming_it():
    proc = subprocess.run([BROKER, "--max-queued-tasks", "0"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "max-queued-tasks must be a positive integer, not 0" in proc.stderr


def test_the_broker_help_names_each_quota_its_default_and_variable():
    proc = subprocess.run([BROKER, "--help"], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # help is wrapped
    for name, lim in SETTINGS.items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"default: {getattr(Limits(), lim)}" in text
        assert f"ZPAR_{name.upper()}" in text


# ---------------------------------------------------------------------- a real broker


def test_a_producer_past_max_queued_tasks_waits_in_its_client_and_loses_nothing(new_cluster, gate):
    cluster = new_cluster(agents=1, workers=1, broker_args=["--max-queued-tasks", "5"])
    with cluster.client() as client:
        blocker = client.submit(tasks.block_until, gate, 60, "blocker")
        wait_for(lambda: cluster.status()["busy"] == 1, 20, what="the one worker blocked")
        futures = [client.submit(tasks.block_until, gate, 60, i) for i in range(20)]
        # The broker holds 5 queued (the agent prefetches at most one more); the client holds the rest.
        wait_for(lambda: cluster.status()["counters"].get("refused_queue_full", 0) > 0, 20,
                 what="the tasks past the quota refused for now")
        status = cluster.status()
        assert status["queued"] <= 5 and status["queued"] + status["running"] <= 8
        assert not any(f.done() for f in futures)  # none failed: they wait

        open(gate, "w").close()
        assert blocker.result(timeout=30) == "blocker"
        assert [f.result(timeout=30) for f in futures] == list(range(20))
        assert client.submit(divmod, 7, 2).result(timeout=30) == (3, 1)
