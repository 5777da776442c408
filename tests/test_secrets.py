"""Secrets handled as the best tools do: private files, a salt per secret, no weak secrets, no silent plaintext.

Each refusal names its fix (`chmod 600`, `zpar keygen`, XDG_CONFIG_HOME); the
cost of deriving keys is measured; a keygen secret carries its salt, so two
processes reading one file derive the same keys and two secrets never do.
Given nothing, every address is authenticated with this user's own secret;
plaintext only when asked for (insecure=True, --insecure).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import zpar
from zpar import config, security
from zpar.config import AgentConfig, BrokerConfig
from zpar.errors import ConfigError

ZPAR = os.path.join(os.path.dirname(sys.executable), "zpar")
TYPED = "test-secret-" + "q7Zr2mXv9LpT4wYk"  # a typed secret strong enough to pass the estimate


def _secret_file(tmp_path, mode=0o600, text=None, name="secret"):
    path = tmp_path / name
    path.write_text((text or security.generate_secret()) + "\n")
    path.chmod(mode)
    return path


def _public_key(text: str) -> dict:
    return {role: pair.public for role, pair in security.derive_keys(text).items()}


def _run(*args, env=None):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------- files only their owner reads


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_secret_file_others_may_read_is_refused_with_chmod_600(tmp_path, mode):
    path = _secret_file(tmp_path, mode)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        security.read_secret_file(path)
    with pytest.raises(ConfigError, match="chmod 600"):
        security.client_credentials("producer", secret_file=str(path))


def test_a_key_secret_file_others_may_read_is_refused_and_its_public_half_is_not(tmp_path):
    public, secret = security.make_keypair_files(tmp_path, "node1")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {secret}"):
        security.load_keypair(secret, need_secret=True)
    public.chmod(0o644)
    assert security.load_keypair(public, need_secret=False).public


def test_a_file_in_systemds_credentials_directory_is_trusted_whatever_its_group_bits(tmp_path, monkeypatch):
    # systemd gives a credential to the unit's user alone, possibly by an ACL that shows as group bits.
    path = _secret_file(tmp_path, 0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert security.read_secret_file(path)


def test_the_cli_refuses_a_readable_secret_file_with_exit_2(tmp_path):
    path = _secret_file(tmp_path, 0o644)
    out = _run(ZPAR, "broker", "--secret-file", str(path), "--frontend", "tcp://127.0.0.1:0")
    assert out.returncode == 2 and "chmod 600" in out.stderr


# ---------------------------------------------------------------------- empty settings are errors


@pytest.mark.parametrize("kwargs", [{"secret": ""}, {"secret": b"  "}, {"secret_file": ""}, {"key_file": ""}])
def test_an_empty_credential_argument_is_refused(kwargs):
    with pytest.raises(ConfigError, match="empty"):
        zpar.Client("tcp://127.0.0.1:1", connect_timeout=0.1, **kwargs)


def test_an_empty_zpar_secret_file_variable_is_refused_by_the_client(monkeypatch):
    monkeypatch.setenv("ZPAR_SECRET_FILE", "")
    with pytest.raises(ConfigError, match="ZPAR_SECRET_FILE is set but empty"):
        zpar.Client("tcp://127.0.0.1:1", connect_timeout=0.1)


@pytest.mark.parametrize("cls", [BrokerConfig, AgentConfig])
@pytest.mark.parametrize("name", ["ZPAR_SECRET_FILE", "ZPAR_SECRET", "ZPAR_KEY_FILE"])
def test_an_empty_credential_variable_is_refused_by_the_daemons(cls, name):
    with pytest.raises(ConfigError, match=f"{name} is set but empty"):
        config.load(cls, {}, {name: ""})


def test_an_empty_secret_flag_or_file_setting_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--secret-file is set but empty"):
        config.load(AgentConfig, {"secret_file": ""}, {})
    toml = tmp_path / "zpar.toml"
    toml.write_text('[broker]\nsecret_file = ""\n')
    with pytest.raises(ConfigError, match="secret_file in \\[broker\\]"):
        config.load(BrokerConfig, {}, {}, toml)


def test_the_agent_cli_refuses_an_empty_secret_file_variable_with_exit_2():
    out = _run(ZPAR, "agent", env={"ZPAR_SECRET_FILE": ""})
    assert out.returncode == 2 and "ZPAR_SECRET_FILE is set but empty" in out.stderr


def test_an_empty_secret_file_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty; make one with `zpar keygen"):
        security.read_secret_file(path)


# ---------------------------------------------------------------------- weak secrets


@pytest.mark.parametrize("weak", ["password12345678", "passwordpasswordpassword", "Tr0ub4dor&3Tr0ub4dor&3",
                                  "abcdefghijklmnopqrstuvwxyz0123456789", "1234567890" * 4, "qwertyuiop123456",
                                  "letmein-letmein-letmein", "a" * 64, "ab" * 30])
def test_a_guessable_secret_is_refused_naming_zpar_keygen(weak):
    with pytest.raises(ConfigError, match="zpar keygen"):
        security.check_secret(weak)
    with pytest.raises(ConfigError, match="zpar keygen"):
        security.derive_keys(weak)


def test_a_guessable_secret_in_an_old_file_is_refused(tmp_path):
    path = _secret_file(tmp_path, text="password12345678")
    with pytest.raises(ConfigError, match="zpar keygen"):
        security.read_secret_file(path)


@pytest.mark.parametrize("strong", [TYPED, "xK9#mP2$vL5nQ8wR&tY4", "Zq3-Vv8n-Rk2w-Pm7c-Ht5x-Lb9d"])
def test_a_strong_typed_secret_is_accepted(strong):
    assert security.estimate_bits(strong) >= security.MIN_SECRET_BITS
    assert security.check_secret(strong)


def test_a_damaged_or_unknown_keygen_secret_is_refused():
    good = security.generate_secret()
    with pytest.raises(ConfigError, match="damaged"):
        security.check_secret(good[:-3])
    with pytest.raises(ConfigError, match="format"):
        security.check_secret("zpar-secret-v9:" + good.split(":", 1)[1])


# ---------------------------------------------------------------------- a salt per secret


def test_keygen_writes_a_salted_secret_file_mode_600_and_never_overwrites(tmp_path):
    path = tmp_path / "secret"
    out = _run(ZPAR, "keygen", "--out", str(path))
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text().strip()
    prefix, salt, secret = text.split(":")
    assert prefix == security.FILE_FORMAT and len(salt) == 22 and len(secret) == 43
    again = _run(ZPAR, "keygen", "--out", str(path))
    assert again.returncode == 2 and "exists" in again.stderr
    assert path.read_text().strip() == text


def test_two_keygen_secrets_differ_in_salt_and_keys():
    a, b = security.generate_secret(), security.generate_secret()
    assert a.split(":")[1] != b.split(":")[1] and a.split(":")[2] != b.split(":")[2]
    assert _public_key(a)["broker"] != _public_key(b)["broker"]


def test_the_salt_is_part_of_the_key():
    a = security.generate_secret()
    prefix, _, secret = a.split(":")
    other_salt = security.generate_secret().split(":")[1]
    assert _public_key(a)["broker"] != _public_key(f"{prefix}:{other_salt}:{secret}")["broker"]


_PRINT_KEYS = ("import sys; from zpar import security; "
               "print(security.client_credentials('producer', secret_file=sys.argv[1]).broker.public.decode())")


def test_two_processes_with_the_same_secret_file_derive_the_same_keys(tmp_path):
    path = _secret_file(tmp_path)
    seen = {_run(sys.executable, "-c", _PRINT_KEYS, str(path)).stdout.strip() for _ in range(2)}
    assert len(seen) == 1
    assert seen == {security.derive_keys(path.read_text())["broker"].public.decode()}
    # The same line given as ZPAR_SECRET carries its salt too: the same keys.
    assert _public_key(path.read_text().strip())["broker"].decode() in seen


def test_an_old_secret_file_without_a_salt_is_accepted_with_a_warning(tmp_path, caplog):
    path = _secret_file(tmp_path, text="Kq3vR9xT2mLw8ZpN5cYh7BfJ4dGs6AeU1nVb0XiOoQk")  # an old `zpar keygen`
    with caplog.at_level("WARNING", logger="zpar.security"):
        raw = security.read_secret_file(path)
    assert "zpar keygen --out" in caplog.text
    assert security.derive_keys(raw)


def test_deriving_keys_costs_under_half_a_second_and_once_per_process():
    secret = security.generate_secret()
    start = time.perf_counter()
    security.derive_keys(secret)
    took = time.perf_counter() - start
    assert security.SCRYPT_N >= 2**17
    assert took < 0.5 * 2, f"deriving took {took:.2f} s"  # 0.36 s here; slack for a loaded machine
    start = time.perf_counter()
    security.derive_keys(secret)
    assert time.perf_counter() - start < 0.01  # cached: once per process


# ---------------------------------------------------------------------- no plaintext unless asked for


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:5555", "tcp://broker.example:5555", "tcp://0.0.0.0:5555",
                                     "tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555"])
def test_a_client_given_nothing_uses_this_users_secret_for_any_tcp_address(address):
    creds = security.client_credentials("producer", address=address)
    assert creds.origin == f"this user's secret {security.user_secret_path()}"
    assert creds.broker.public == security.derive_keys(security.user_secret())["broker"].public
    assert creds.own.public == security.derive_keys(security.user_secret())["producer"].public


def test_a_client_with_insecure_true_may_connect_in_plaintext(monkeypatch):
    monkeypatch.delenv("ZPAR_SECRET_FILE", raising=False)
    monkeypatch.delenv("ZPAR_SECRET", raising=False)
    assert security.client_credentials("producer", insecure=True, address="tcp://192.0.2.1:5555") is None
    # Nothing listens there: the client waits for a broker, in plaintext.
    with pytest.raises(zpar.BrokerUnavailable):
        zpar.Client("tcp://192.0.2.1:5555", insecure=True, connect_timeout=0.2)


def test_insecure_does_not_drop_credentials_that_were_given():
    creds = security.client_credentials("producer", secret=TYPED, insecure=True)
    assert creds is not None and creds.broker.public == _public_key(TYPED)["broker"]


def test_an_ipc_address_needs_no_credentials_its_socket_files_mode_guards_it():
    assert security.client_credentials("producer", address="ipc:///tmp/zpar-x/frontend") is None
    assert security.client_credentials("agent", address="inproc://zpar") is None
    assert security.broker_credentials(default=False) is None  # a broker with no TCP socket


def test_an_agent_given_nothing_uses_this_users_secret_and_insecure_uses_none():
    assert not AgentConfig(broker="tcp://10.0.0.5:5556").secured
    assert AgentConfig(broker="tcp://10.0.0.5:5556", insecure=True).insecure
    assert AgentConfig(broker="tcp://10.0.0.5:5556", secret=TYPED).secured
    creds = security.client_credentials("agent", address="tcp://10.0.0.5:5556")
    assert creds.own.public == security.derive_keys(security.user_secret())["agent"].public
    assert security.client_credentials("agent", insecure=True, address="tcp://10.0.0.5:5556") is None


def test_the_agent_cli_without_a_usable_config_home_exits_2_naming_xdg_config_home(tmp_path, monkeypatch):
    for name in ("ZPAR_SECRET", "ZPAR_SECRET_FILE", "ZPAR_KEY_FILE", "ZPAR_BROKER_KEY", "ZPAR_INSECURE"):
        monkeypatch.delenv(name, raising=False)
    blocked = tmp_path / "config"
    blocked.write_text("a file where a directory should be\n")
    out = _run(ZPAR, "agent", "--broker", "tcp://10.0.0.5:5556", env={"XDG_CONFIG_HOME": str(blocked)})
    assert out.returncode == 2, out.stderr
    assert "XDG_CONFIG_HOME" in out.stderr and "--insecure" in out.stderr
