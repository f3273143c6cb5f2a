"""``tessera up --engine ray``: every offline job the platform runs (batch blocks, backfill,
the training-data scan of each model, the periodic consistency check) gets the engine, and
each command line it builds is one the CLI accepts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tessera.cli import cli
from tessera.up import Platform, UpConfig


class _Recorder(Platform):
    def run_step(self, name, args, timeout_s=1800):
        self.steps.append((name, args))

    def spawn(self, name, args, oneshot=False):
        self.steps.append((name, args))
        return None


def _commands(config: UpConfig) -> dict[str, list[str]]:
    platform = _Recorder(config, say=lambda _m: None)
    platform.steps = []
    platform.train_all(1_796_000_000_000, 1_796_086_400_000)
    platform.serving_since_ms = 1_796_000_000_000
    assert platform.check_consistency()
    return {name: args[args.index("--log-level") + 2:] for name, args in platform.steps}


def test_every_offline_job_runs_on_ray_with_the_cluster_given(tmp_path):
    commands = _commands(UpConfig(home=tmp_path, offline_engine="ray",
                                  ray_address="ray://head:10001"))
    assert sorted(commands) == ["backfill", "batch", "consistency", "train-l1", "train-l2",
                                "train-retrieval"]
    for name, args in commands.items():
        at = args.index("--engine")
        assert args[at:at + 4] == ["--engine", "ray", "--ray-address", "ray://head:10001"], name
        # the options exist on that command (--help comes after them: an unknown one fails)
        res = CliRunner().invoke(cli, [*args, "--help"])
        assert res.exit_code == 0, f"{name}: {res.output}"


def test_the_local_engine_adds_nothing_and_bad_settings_are_refused(tmp_path):
    assert all("--engine" not in args for args in _commands(UpConfig(home=tmp_path)).values())
    with pytest.raises(ValueError, match="offline_engine"):
        UpConfig(home=tmp_path, offline_engine="spark")
    with pytest.raises(ValueError, match="ray_address needs"):
        UpConfig(home=tmp_path, ray_address="ray://head:10001")
    res = CliRunner().invoke(cli, ["up", "--home", str(tmp_path), "--ray-address", "x:1"])
    assert res.exit_code == 2 and "ray_address needs" in res.output
