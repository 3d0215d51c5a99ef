"""Config system: precedence, type checks, unknown keys, field-naming errors."""

import pytest

from shodh.config import RunConfig, available_profiles, load_config, parse_override
from shodh.errors import ConfigError


def test_shipped_profiles_load_and_validate():
    assert {"smoke", "demo", "paper"} <= set(available_profiles())
    grids = {p: load_config(p).sim.grid for p in ("smoke", "demo", "paper")}
    assert grids == {"smoke": 32, "demo": 64, "paper": 128}


def test_routers_profile_is_the_demo_with_more_trajectories_and_steps():
    """The router study's profile may differ from the demo only where README's Stage 6 says it does."""
    import dataclasses

    demo, routers = load_config("demo"), load_config("routers")
    assert (routers.sim.trajectories.train, routers.sim.trajectories.val, routers.sim.trajectories.test) == (12, 2, 4)
    assert (routers.train.max_steps, routers.train.ckpt_every, routers.train.val_every) == (960, 240, 240)
    same = dataclasses.replace(
        routers, profile=demo.profile, sim=dataclasses.replace(routers.sim, trajectories=demo.sim.trajectories),
        train=dataclasses.replace(routers.train, max_steps=demo.train.max_steps, ckpt_every=demo.train.ckpt_every,
                                  val_every=demo.train.val_every))
    assert same == demo


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
        ("tokenizer.solid_weight=0", "tokenizer.solid_weight"),
        ("tokenizer.spectrum_target=1.5", "tokenizer.spectrum_target"),
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


def test_numbers_as_users_write_them(tmp_path):
    """YAML 1.1 reads `1e-3` (no dot) as a string: a float field takes it as the number it is,
    from a profile and from an override; inf/nan are refused, naming the field."""
    profile = tmp_path / "p.yaml"
    profile.write_text("train:\n  lr: 1e-3\n")
    assert load_config(str(profile)).train.lr == 1e-3
    assert load_config("smoke", ["train.lr=1e6"]).train.lr == 1e6
    for bad in ("train.lr=.inf", "train.lr=-.inf", "train.lr=.nan"):
        with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
            load_config("smoke", [bad])
    with pytest.raises(ConfigError, match="sim.grid: expected int"):
        load_config("smoke", ["sim.grid=1e3"])  # ints stay strict


def test_malformed_yaml_is_one_line_with_its_position(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("train:\n  lr: [1, 2\n  warmup_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(profile))
    message = str(err.value)
    assert "\n" not in message and "invalid YAML" in message and "line 3, column" in message


def test_solver_memory_is_checked_before_allocating():
    from shodh.physics.simulate import SimConfig, check_memory

    with pytest.raises(ConfigError, match=r"sim.grid: 4096\^3 in float32 needs about 21760.0 GiB"):
        check_memory(SimConfig(grid=4096))
    check_memory(SimConfig(grid=32))
