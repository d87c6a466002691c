"""Config: defaults, TOML, environment, overrides, validation incl. the stability region."""

import pytest

from easgd_mpi.config import Config
from easgd_mpi.errors import ConfigError


def load(text=None, tmp_path=None, env=None, **overrides):
    path = None
    if text is not None:
        path = tmp_path / "c.toml"
        path.write_text(text)
    return Config.from_toml(path, overrides=overrides, environ=env or {})


def test_defaults_are_the_papers():
    cfg = load()
    assert cfg.algorithm == "easgd" and cfg.tau == 4
    assert cfg.resolve_alpha(4) == pytest.approx(0.9 / 4)
    assert cfg.resolve_beta(4) == pytest.approx(0.9)


def test_precedence_cli_over_file_over_env(tmp_path):
    cfg = load("tau = 8\nlr = 0.1\n", tmp_path, env={"EASGD_TAU": "2", "EASGD_SEED": "7"}, tau="16")
    assert cfg.tau == 16 and cfg.lr == 0.1 and cfg.seed == 7


def test_env_nested_key_and_unrelated_vars_ignored():
    cfg = load(env={"EASGD_DATA__NAME": "synthetic", "EASGD_CUDA_MPI": "1"})
    assert cfg.data.name == "synthetic"


def test_from_dict_is_what_a_toml_table_gives():
    cfg = Config.from_dict({"tau": 8, "data": {"name": "synthetic"}})
    assert cfg.tau == 8 and cfg.data.name == "synthetic"
    with pytest.raises(ConfigError, match="unknown key 'data.nme'"):
        Config.from_dict({"data": {"nme": "x"}})


def test_round_trip_through_toml(tmp_path):
    cfg = load(
        **{
            "model.hidden": "[32, 16]",
            "rho": "2.0",
            "quadratic.curvature": "[1, 2]",
            "quadratic.dim": "2",
        }
    )
    again = load(cfg.to_toml(), tmp_path)
    assert again == cfg
    assert again.resolve_alpha(3) == pytest.approx(cfg.lr * 2.0)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"algorithm": "sgdx"}, "algorithm = 'sgdx' is not one of"),
        ({"lr": "0"}, "lr = 0.0 must be > 0"),
        ({"lr": "-1"}, "lr = -1.0 must be > 0"),
        ({"tau": "0"}, "tau = 0 must be >= 1"),
        ({"momentum": "1.0", "algorithm": "eamsgd"}, "momentum = 1.0 must be in [0, 1)"),
        ({"momentum": "-0.1", "algorithm": "eamsgd"}, "momentum = -0.1 must be in [0, 1)"),
        ({"momentum": "0.9"}, "momentum = 0.9 is not used by algorithm 'easgd'"),
        ({"tau": "2.5"}, "'tau' must be an integer"),
        ({"lr": "true"}, "'lr' must be a number"),
        ({"alpha": "0.1", "beta": "0.5"}, "exactly one of rho, alpha, beta"),
        ({"lock_mode": "none"}, "lock_mode = 'none' is not one of shared, exclusive"),
        ({"model.hidden": "[0]"}, "model.hidden"),
        ({"quadratic.dim": "3", "quadratic.optimum": "[1, 2]"}, "quadratic.optimum has 2"),
    ],
)
def test_bad_values_name_key_and_bound(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load(**overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_misspelt_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="unknown key 'lerning_rate'"):
        load(lerning_rate="0.1")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load(batchsize="3")
    with pytest.raises(ConfigError, match="did you mean 'data.name'"):
        load(**{"data.nmae": "digits"})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Config.from_toml(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load("lr = [\n", tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'data.nope'"):
        load("[data]\nnope = 1\n", tmp_path)


@pytest.mark.parametrize(
    "overrides, workers, fragment",
    [
        ({"beta": "2.0"}, 4, "0 < beta < 2"),
        ({"alpha": "1.5"}, 4, "0 < alpha <= 1"),
        ({"rho": "30", "lr": "0.05"}, 2, "alpha = lr*rho"),
        ({"model.name": "quadratic", "quadratic.curvature": "30", "lr": "0.1"}, 2, "lr*h <= 2"),
        (
            {"model.name": "quadratic", "alpha": "0.8", "lr": "0.5", "quadratic.curvature": "2"},
            4,
            "(4 - 2*lr*h)/(4 - lr*h)",
        ),
    ],
)
def test_stability_region(overrides, workers, fragment):
    cfg = load(**overrides)
    with pytest.raises(ConfigError) as info:
        cfg.validate(workers=workers)
    assert fragment in str(info.value)


def test_stable_values_pass():
    load(
        **{"model.name": "quadratic", "alpha": "0.6", "lr": "0.5", "quadratic.curvature": "1"}
    ).validate(workers=4)
    load(beta="0.9").validate(workers=1)


def test_resume_precedence_is_one_rule_and_the_changes_are_listed(tmp_path):
    """defaults < the checkpoint's config < environment < file < --set, with the source of
    every change named for the start-up line of a resumed run."""
    base = Config.from_toml(None, overrides={"steps": 100, "lr": 0.03, "tau": 8}, environ={})
    base_toml = base.to_toml()
    file = tmp_path / "c.toml"
    file.write_text("tau = 2\nsteps = 300\n")

    only_base = Config.from_toml(None, environ={}, base_toml=base_toml)
    assert (only_base.steps, only_base.lr, only_base.tau) == (100, 0.03, 8)
    assert only_base.changes_from(base_toml) == []

    env = {"EASGD_STEPS": "200", "EASGD_LR": "0.02"}
    cfg = Config.from_toml(file, overrides={"steps": 400}, environ=env, base_toml=base_toml)
    assert cfg.lr == 0.02  # the environment beats the checkpoint
    assert cfg.tau == 2  # the file beats both
    assert cfg.steps == 400  # --set beats everything
    assert cfg.changes_from(base_toml) == [
        "lr 0.03 → 0.02 (the environment)",
        "steps 100 → 400 (--set)",
        f"tau 8 → 2 ({file})",
    ]


# ---- the one precedence rule on resume (Config.over_checkpoint) ------------------------------


def _checkpoint_config(**values) -> str:
    cfg = Config()
    for key, value in values.items():
        cfg.set(key.replace("__", "."), value, source="test")
    return cfg.to_toml()


def test_what_a_launch_states_wins_over_the_checkpoint_and_the_rest_is_the_checkpoints(
    tmp_path,
):
    base = _checkpoint_config(lr=0.1, tau=2, steps=77, seed=9, data__name="synthetic")
    path = tmp_path / "run.toml"
    path.write_text("tau = 8\n[data]\nname = 'digits'\n")
    launch = Config.from_toml(path, overrides={"steps": "500"}, environ={"EASGD_SEED": "3"})
    merged = launch.over_checkpoint(base)
    # defaults < checkpoint (lr) < environment (seed) < file (tau, data.name) < --set (steps)
    assert (merged.lr, merged.seed, merged.tau, merged.data.name, merged.steps) == (
        0.1,
        3,
        8,
        "digits",
        500,
    )
    changes = merged.changes_from(base)
    assert "steps 77 → 500 (--set)" in changes and "tau 2 → 8 (" + str(path) + ")" in changes
    assert "seed 9 → 3 (the environment)" in changes


def test_a_launch_that_states_the_default_still_wins_over_the_checkpoint():
    # tau = 4 is the default; the checkpoint's run had tau = 2: the launch said 4, so 4.
    base = _checkpoint_config(tau=2)
    merged = Config.from_toml(overrides={"tau": "4"}, environ={}).over_checkpoint(base)
    assert merged.tau == 4


def test_a_config_built_in_code_states_what_differs_from_the_defaults():
    base = _checkpoint_config(lr=0.1, steps=77)
    cfg = Config()
    cfg.steps = 500
    merged = cfg.over_checkpoint(base)
    assert (merged.steps, merged.lr) == (500, 0.1)
    assert cfg.given_keys() == {"steps": "the script"}
