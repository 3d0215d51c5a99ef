"""Config system: precedence, type checks, unknown keys, field-naming errors."""

import pytest

from shodh.config import RunConfig, available_profiles, load_config, parse_override
from shodh.errors import ConfigError


def test_shipped_profiles_load_and_validate():
    assert {"smoke", "demo", "paper"} <= set(available_profiles())
    grids = {p: load_config(p).sim.grid for p in ("smoke", "demo", "paper")}
    assert grids == {"smoke": 32, "demo": 64, "paper": 128}


def test_precedence_defaults_yaml_overrides():
    default = RunConfig()
    cfg = load_config("smoke", ["sim.porous.nu=0.2", "sim.trajectories.val=3"])
    assert cfg.sim.frames == 4 != default.sim.frames  # YAML beats defaults
    assert cfg.sim.porous.nu == 0.2 and cfg.sim.trajectories.val == 3  # overrides beat YAML
    assert cfg.sim.porous.force == default.sim.porous.force  # untouched keys keep defaults
    assert isinstance(load_config("smoke", ["sim.porous.nu=1"]).sim.porous.nu, float)


@pytest.mark.parametrize(
    "override, field",
    [
        ("sim.gridd=3", "sim.gridd"),
        ("sim.grid=40", "sim.grid"),
        ("sim.grid=true", "sim.grid"),
        ("sim.grid=abc", "sim.grid"),
        ("sim.domains=[channel, lava]", "sim.domains[1]"),
        ("sim.dtype=float16", "sim.dtype"),
        ("sim.porous.porosity=[0.9, 0.5]", "sim.porous.porosity"),
        ("sim.channel.re_tau=-1", "sim.channel.re_tau"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("sim.grid.x=1", "sim.grid"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [override])
    assert str(err.value).startswith(field), str(err.value)


def test_bad_override_syntax_and_unknown_profile(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("sim.grid")
    with pytest.raises(ConfigError, match="unknown profile 'nope'.*smoke"):
        load_config("nope")
    custom = tmp_path / "mine.yaml"
    custom.write_text("sim:\n  grid: 32\n  frames: 3\n")
    assert load_config(str(custom)).sim.frames == 3
    custom.write_text("sim:\n  framez: 3\n")
    with pytest.raises(ConfigError, match="sim.framez: unknown key"):
        load_config(str(custom))
