"""Configuration: defaults, YAML, env overrides, and one clear line for a bad key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlflow_sidecar.server.config import (
    MLFLOW_ENV_KEYS,
    ConfigError,
    check_data_dir,
    describe,
    export_mlflow_env,
    load_config,
    redact_uri,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("MLFLOW_SIDECAR") or name in MLFLOW_ENV_KEYS:
            monkeypatch.delenv(name)


def test_defaults_serve_one_machine_with_the_embedded_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    config = load_config()
    assert (config.server.host, config.server.port) == ("127.0.0.1", 50051)
    assert config.embedded
    assert config.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert config.registry_uri == config.tracking_uri
    assert config.artifact_root == tmp_path / "artifacts"


@pytest.fixture()
def homeless(monkeypatch):
    """A process with no home directory: no HOME, and no passwd entry for its uid."""
    import pwd

    monkeypatch.delenv("HOME", raising=False)

    def no_entry(uid: int):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)


def test_a_process_without_a_home_runs_with_a_data_dir_given(homeless, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    assert load_config().data_dir == tmp_path


def test_a_process_without_a_home_is_told_to_set_the_data_dir(homeless):
    with pytest.raises(ConfigError, match="data_dir") as refused:
        load_config()
    assert "home directory" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_default_data_dir_is_under_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config().data_dir == tmp_path / ".mlflow-sidecar"


def test_env_overrides_nested_keys(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "50052")
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", "/var/lib/sidecar")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://mlflow:5000")
    config = load_config()
    assert config.server.port == 50052
    assert config.data_dir == Path("/var/lib/sidecar")
    assert config.tracking_uri == "http://mlflow:5000"
    assert not config.embedded


def test_yaml_file_and_env_precedence(tmp_path, monkeypatch):
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  port: 6000\n  workers: 4\nretry:\n  max_tries: 3\n")
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__PORT", "6001")
    config = load_config(path)
    assert config.server.port == 6001  # env wins over the file
    assert config.server.workers == 4
    assert config.retry.max_tries == 3


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"MLFLOW_SIDECAR__SERVER__PORT": "abc"}, "server.port"),
        ({"MLFLOW_SIDECAR__SERVER__PORT": "70000"}, "server.port"),
        ({"MLFLOW_SIDECAR__RETRY__MAX_TRIES": "0"}, "retry.max_tries"),
        ({"MLFLOW_SIDECAR__LOG_LEVEL": "LOUD"}, "log_level"),
        ({"MLFLOW_SIDECAR__SPOOL__DELIVERY_WORKERS": "0"}, "spool.delivery_workers"),
        ({"MLFLOW_SIDECAR__SPOOL__DELIVERY_WORKERS": "33"}, "spool.delivery_workers"),
    ],
)
def test_invalid_values_name_the_key(monkeypatch, env, key):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert f"invalid config key {key} " in message
    assert "\n" not in message


def test_unknown_yaml_key_is_refused(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"server\.prot"):
        load_config(path)


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_secrets_are_not_shown(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__PASSWORD", "hunter2")
    config = load_config()
    assert "hunter2" not in repr(config)
    assert config.mlflow.password.get_secret_value() == "hunter2"


def test_serve_exits_non_zero_with_one_line_for_a_bad_key(tmp_path):
    cli = Path(sys.executable).with_name("mlflow-sidecar")
    result = subprocess.run(
        [str(cli), "serve"],
        env={
            "MLFLOW_SIDECAR__SERVER__PORT": "not-a-port",
            "MLFLOW_SIDECAR__DATA_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "server.port" in lines[0] and "MLFLOW_SIDECAR__SERVER__PORT" in lines[0]


def test_drain_on_stop_must_fit_the_grace_period(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__GRACE_S", "5")
    monkeypatch.setenv("MLFLOW_SIDECAR__SPOOL__DRAIN_ON_STOP_S", "6")
    with pytest.raises(ConfigError) as refused:
        load_config()
    assert "spool" in str(refused.value) and "server.grace_s" in str(refused.value)
    monkeypatch.setenv("MLFLOW_SIDECAR__SPOOL__DRAIN_ON_STOP_S", "5")
    assert load_config().spool.drain_on_stop_s == 5


def test_an_unset_drain_follows_the_grace_period(monkeypatch):
    """Unset, the drain takes the grace less 2 s for the rest of the stop (at least 80 % of
    a short grace): a longer grace delivers more, a shorter one still fits."""
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__GRACE_S", "2")
    assert load_config().spool.drain_on_stop_s == pytest.approx(1.6)
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__GRACE_S", "30")
    assert load_config().spool.drain_on_stop_s == 28
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER__GRACE_S", "0")
    assert load_config().spool.drain_on_stop_s == 0
    monkeypatch.delenv("MLFLOW_SIDECAR__SERVER__GRACE_S")
    assert load_config().spool.drain_on_stop_s == 8


def test_mlflow_variables_fill_the_mlflow_section_when_its_keys_are_unset(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://registry:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    config = load_config()
    assert not config.embedded
    assert config.tracking_uri == "http://mlflow:5000"
    assert config.registry_uri == "http://registry:5000"
    assert config.mlflow.username == "alice"
    assert config.mlflow.password.get_secret_value() == "pw"
    assert config.mlflow.token.get_secret_value() == "tok"
    assert config.mlflow.insecure_tls is True
    assert config.mlflow.request_timeout_s == 7


def test_the_sidecars_own_keys_win_over_mlflow_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-mlflow-var:5000")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://from-env:5000")
    path = tmp_path / "sidecar.yaml"
    path.write_text("mlflow:\n  request_timeout_s: 9\n")
    config = load_config(path)
    assert config.tracking_uri == "http://from-env:5000"
    assert config.mlflow.request_timeout_s == 9


def test_values_the_sidecar_exported_for_mlflow_are_not_read_back(monkeypatch):
    export_mlflow_env("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    assert load_config().mlflow.request_timeout_s == 30
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "4")  # set by someone else: honoured
    assert load_config().mlflow.request_timeout_s == 4


def test_insecure_tls_false_in_the_file_overrides_mlflows_variable(tmp_path, monkeypatch):
    from mlflow.environment_variables import MLFLOW_TRACKING_INSECURE_TLS

    from mlflow_sidecar.server.mlflow_gateway.environment import configure_mlflow_environment

    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    path = tmp_path / "sidecar.yaml"
    path.write_text("mlflow:\n  tracking_uri: https://mlflow:5000\n  insecure_tls: false\n")
    config = load_config(path)
    assert config.mlflow.insecure_tls is False
    configure_mlflow_environment(config)
    # What MLflow's client reads when it connects: certificate checks stay on.
    assert MLFLOW_TRACKING_INSECURE_TLS.get() is False
    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS")
    configure_mlflow_environment(load_config(path))
    assert MLFLOW_TRACKING_INSECURE_TLS.get() is False


def test_credential_keys_set_to_empty_keep_inherited_credentials_from_mlflow(monkeypatch):
    """README: where the key is set, its value is what MLflow's client gets."""
    from mlflow.environment_variables import (
        MLFLOW_TRACKING_PASSWORD,
        MLFLOW_TRACKING_TOKEN,
        MLFLOW_TRACKING_USERNAME,
    )

    from mlflow_sidecar.server.mlflow_gateway.environment import configure_mlflow_environment

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer-user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "trainer-pass")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "trainer-token")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__USERNAME", "")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__PASSWORD", "")
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__TOKEN", "configured-token")
    configure_mlflow_environment(load_config())
    assert not MLFLOW_TRACKING_USERNAME.is_set()
    assert not MLFLOW_TRACKING_PASSWORD.is_set()
    assert MLFLOW_TRACKING_TOKEN.get() == "configured-token"


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_data_dir_is_refused_not_read_as_the_working_directory(monkeypatch, blank):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", blank)
    with pytest.raises(ConfigError, match=r"data_dir \(MLFLOW_SIDECAR__DATA_DIR\).*empty"):
        load_config()


def test_a_bad_mlflow_variable_is_named_as_such(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "soon")
    named = r"mlflow\.request_timeout_s \(MLFLOW_HTTP_REQUEST_TIMEOUT\)"
    with pytest.raises(ConfigError, match=named):
        load_config()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MLFLOW_SIDECAR__SERVR__PORT", "did you mean MLFLOW_SIDECAR__SERVER__PORT?"),
        ("MLFLOW_SIDECAR__SERVER__PROT", "did you mean MLFLOW_SIDECAR__SERVER__PORT?"),
        ("MLFLOW_SIDECAR__SERVER__PORT__X", "server.port has no key 'x'"),
        ("MLFLOW_SIDECAR__ZZZZZZ", "the top level has no key 'zzzzzz'"),
    ],
)
def test_unknown_sidecar_variables_are_refused(monkeypatch, name, expected):
    monkeypatch.setenv(name, "1")
    with pytest.raises(ConfigError) as err:
        load_config()
    message = str(err.value)
    assert message.startswith(f"unknown setting {name}: ")
    assert expected in message
    assert "\n" not in message


def test_every_known_variable_is_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER", '{"port": 50060}')  # a section as JSON
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__PROBE_INTERVAL_S", "0.5")
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    config = load_config()
    assert config.server.port == 50060
    assert config.mlflow.probe_interval_s == 0.5


def test_malformed_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  port: [1,\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config file {path} is not valid YAML: ")
    assert "line" in message
    assert "\n" not in message


def test_a_data_dir_that_takes_no_files_is_refused(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(blocker / "data"))
    named = r"data_dir \(MLFLOW_SIDECAR__DATA_DIR\): .* not a writable"
    with pytest.raises(ConfigError, match=named):
        check_data_dir(load_config())


def test_a_writable_data_dir_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path / "new" / "data"))
    check_data_dir(load_config())
    assert (tmp_path / "new" / "data").is_dir()


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cret@mlflow:5000/path", "https://***@mlflow:5000/path"),
        ("http://token@mlflow", "http://***@mlflow"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
        ("postgresql://u:p@db/mlflow", "postgresql://***@db/mlflow"),
    ],
)
def test_uris_are_redacted(uri, shown):
    assert redact_uri(uri) == shown


def test_the_mode_line_names_the_store_and_hides_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    assert describe(load_config()).startswith("mode: embedded MLflow store sqlite:///")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-value")
    line = describe(load_config())
    assert line.startswith("mode: MLflow server https://***@mlflow:5000")
    assert "s3cret" not in line and "tok-value" not in line
    assert "token" in line


def test_an_empty_token_names_the_setting_it_came_from(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_SIDECAR__AUTH__TOKENS", '[""]')
    with pytest.raises(ConfigError, match=r"invalid config key auth\.tokens: it holds no token"):
        load_config()
    monkeypatch.delenv("MLFLOW_SIDECAR__AUTH__TOKENS")
    empty = tmp_path / "tokens"
    empty.write_text("# none yet\n")
    monkeypatch.setenv("MLFLOW_SIDECAR__AUTH__TOKENS_FILE", str(empty))
    with pytest.raises(ConfigError, match=r"invalid config key auth\.tokens_file: it holds no"):
        load_config()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("server:\n  port: true\n", "server.port"),
        ("spool:\n  max_points: true\n", "spool.max_points"),
        ("retry:\n  max_tries: false\n", "retry.max_tries"),
        ("server:\n  grace_s: true\n", "server.grace_s"),
    ],
)
def test_a_boolean_is_no_number(tmp_path, text, key):
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} .*not the boolean"):
        load_config(path)


def test_a_boolean_in_a_json_section_variable_is_no_number(monkeypatch):
    monkeypatch.setenv("MLFLOW_SIDECAR__SERVER", '{"port": true}')
    with pytest.raises(ConfigError, match=r"server\.port .*not the boolean true"):
        load_config()


@pytest.mark.parametrize(
    ("text", "kind"),
    [("5\n", "number"), ("- a: 1\n", "list"), ("[]\n", "list"), ("just words\n", "string")],
)
def test_a_config_file_holds_a_mapping_of_sections(tmp_path, text, kind):
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file {path} must hold a mapping of sections (server:, mlflow:, ...);"
        f" it holds a {kind}"
    )


def test_an_empty_config_file_is_the_defaults(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config(path).server.port == 50051


@pytest.mark.parametrize(
    ("variable", "value"),
    [("MLFLOW_SIDECAR__AUTH__TOKENS", "abc"), ("MLFLOW_SIDECAR__ARTIFACTS__ALLOWED_ROOTS", "[/x")],
)
def test_a_variable_that_must_be_json_is_named(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"{variable} must be JSON"):
        load_config()


@pytest.mark.parametrize(
    "key",
    [
        "server.grace_s",
        "server.default_deadline_s",
        "retry.max_time_s",
        "spool.flush_timeout_s",
        "spool.drain_on_stop_s",
        "mlflow.request_timeout_s",
    ],
)
@pytest.mark.parametrize("value", ["inf", "nan", "1e10"])
def test_a_duration_a_stop_or_a_deadline_cannot_keep_is_refused(key, value, monkeypatch):
    """Past about 9.2e9 s thread waits and deadlines overflow: the stop would fail."""
    section, name = key.split(".")
    monkeypatch.setenv(f"MLFLOW_SIDECAR__{section.upper()}__{name.upper()}", value)
    with pytest.raises(ConfigError) as refused:
        load_config()
    assert key in str(refused.value)


@pytest.mark.parametrize(
    "text",
    [
        "auth:\n  tokens: very-secret-token\n",
        "auth:\n  tokens: [[very-secret-token]]\n",
        "mlflow:\n  password: [very-secret-token]\n",
        "mlflow:\n  token: {t: very-secret-token}\n",
        # A misspelt key may hold a secret all the same.
        "mlflow:\n  pasword: very-secret-token\n",
        "auth:\n  token: very-secret-token\n",
        "mlflow:\n  tracking_url: http://alice:very-secret-token@mlflow:5000\n",
    ],
)
def test_a_secret_of_the_wrong_shape_is_named_but_not_shown(text, tmp_path):
    """README: tokens are never logged, also when the config gives one the wrong shape."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path, data_dir=tmp_path)
    message = str(refused.value)
    assert "very-secret-token" not in message
    assert ("auth.tokens" in message) or ("mlflow." in message)


def test_a_misspelt_key_is_named_with_the_key_meant(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("mlflow:\n  pasword: very-secret-token\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, data_dir=tmp_path)
    assert str(refused.value) == (
        "unknown config key mlflow.pasword: mlflow has no key 'pasword';"
        " did you mean mlflow.password?"
    )


def test_a_bad_value_of_an_ordinary_setting_is_still_shown(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: not-a-port\n")
    with pytest.raises(ConfigError, match="not-a-port"):
        load_config(path, data_dir=tmp_path)


@pytest.mark.parametrize("value", ["2.5", "0", "3601"])
def test_the_mlflow_request_timeout_is_whole_seconds_up_to_an_hour(monkeypatch, tmp_path, value):
    # MLflow reads MLFLOW_HTTP_REQUEST_TIMEOUT as a whole number, as the README's row says.
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match=r"mlflow\.request_timeout_s"):
        load_config()
    monkeypatch.setenv("MLFLOW_SIDECAR__MLFLOW__REQUEST_TIMEOUT_S", "3600")
    assert load_config().mlflow.request_timeout_s == 3600


def test_room_to_keep_free_beyond_the_whole_disk_is_refused(tmp_path, monkeypatch):
    # The spool would refuse every point as DISK_FULL, for good: say so at start instead.
    stats = os.statvfs(tmp_path)
    size = stats.f_blocks * stats.f_frsize
    monkeypatch.setenv("MLFLOW_SIDECAR__DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLFLOW_SIDECAR__SPOOL__MIN_FREE_BYTES", str(size))
    named = (
        r"spool.min_free_bytes \(MLFLOW_SIDECAR__SPOOL__MIN_FREE_BYTES\): "
        rf"{size} bytes to keep free is not less than the {size} bytes"
    )
    with pytest.raises(ConfigError, match=named):
        check_data_dir(load_config())
    monkeypatch.setenv("MLFLOW_SIDECAR__SPOOL__MIN_FREE_BYTES", str(size - 1))
    check_data_dir(load_config())


def test_a_section_given_twice_in_the_file_is_refused_naming_it(tmp_path):
    # YAML keeps the last `server:` block: the first one's port was dropped without a word.
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "server:\n  port: 50070\nmlflow:\n  probe_interval_s: 1\nserver:\n  workers: 8\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"config file {path} gives the key server (lines 1 and 5) twice")
    assert "\n" not in message


def test_a_key_given_twice_in_a_section_is_refused_without_its_values(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text("mlflow:\n  password: first-s3cret\n  password: second-s3cret\n")
    with pytest.raises(ConfigError, match=r"mlflow\.password \(lines 2 and 3\)") as err:
        load_config(path)
    assert "s3cret" not in str(err.value)


def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    # A secret mounted 0600 for another user: the settings' reading failed with a traceback.
    import errno

    path = tmp_path / "sidecar.yaml"
    path.write_text("server:\n  port: 50070\n")
    real_open = Path.open

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config file {path} cannot be read (Permission denied)"


@pytest.mark.parametrize(
    ("uri", "setting"),
    [("http://127.0.0.1:50070", "server.port"), ("http://localhost:9090/", "metrics.port")],
)
def test_an_mlflow_uri_at_the_sidecars_own_port_is_refused(tmp_path, uri, setting):
    # It served, every MLflow call failing and the spool keeping every point it took.
    with pytest.raises(ConfigError, match=rf"mlflow\.tracking_uri .*own {setting}"):
        load_config(
            data_dir=tmp_path,
            server={"port": 50070},
            metrics={"port": 9090},
            mlflow={"tracking_uri": uri},
        )
    other = load_config(
        data_dir=tmp_path,
        server={"port": 50070},
        mlflow={"tracking_uri": uri.replace("50070", "5000").replace("9090", "5000")},
    )
    assert other.mlflow.tracking_uri.endswith(("5000", "5000/"))


def test_an_mlflow_uri_at_the_same_port_of_another_loopback_address_is_kept(tmp_path):
    config = load_config(
        data_dir=tmp_path, server={"port": 50070}, mlflow={"tracking_uri": "http://127.0.0.2:50070"}
    )
    assert config.mlflow.tracking_uri == "http://127.0.0.2:50070"
