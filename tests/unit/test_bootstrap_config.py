"""The bootstrap CLI's config file: keys are flag names, flags win, unknown keys and bad values are named."""

from __future__ import annotations

import pytest

from atlas_swarm.bootstrap import parse_args
from atlas_swarm.errors import ConfigError
from atlas_swarm.monitor.http import parse_listen


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text('identity = "/x/id.key"\nhost_maddrs = ["/ip4/0.0.0.0/tcp/4000"]\nhttp = "127.0.0.1:9000"\n')
    a = parse_args(["--config", str(cfg)])
    assert a.identity == "/x/id.key" and a.host_maddrs == ["/ip4/0.0.0.0/tcp/4000"] and a.http == "127.0.0.1:9000"
    a = parse_args(["--config", str(cfg), "--http", "127.0.0.1:9100"])
    assert a.http == "127.0.0.1:9100"


def test_config_mistakes_are_named(tmp_path, capsys):
    cfg = tmp_path / "b.toml"
    cfg.write_text('identity = "/x"\nhost_maddr = ["/ip4/0.0.0.0/tcp/1"]\n')
    with pytest.raises(SystemExit, match="unknown keys \\['host_maddr'\\]"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("identity = \n")
    with pytest.raises(SystemExit, match="not valid TOML"):
        parse_args(["--config", str(cfg)])
    with pytest.raises(SystemExit):
        parse_args([])  # a bootstrap node needs --identity
    assert "--identity is required" in capsys.readouterr().err
    for bad in ("8080", "localhost:http", "127.0.0.1:99999"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_listen(bad)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
