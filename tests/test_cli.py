"""The command line and Python build the same run: presets, explicit values, and flag checks (no model)."""
import dataclasses

import pytest

import common as C
import grpo


@pytest.mark.parametrize("variant", list(grpo.VARIANTS))
def test_a_preset_gives_the_same_run_from_python_as_from_the_command_line(variant):
    from_python = grpo.Args(variant=variant)
    assert from_python == C.parse_args(grpo.Args, ["--variant", variant])
    for name, value in grpo.VARIANTS[variant].items():
        assert getattr(from_python, name) == value, name


def test_an_explicit_value_wins_over_its_preset_in_python_and_on_the_command_line():
    a = grpo.Args(variant="dapo", eps_high=0.2, dynamic_sampling=False)
    assert (a.eps_high, a.dynamic_sampling, a.loss_agg) == (0.2, False, "token-mean")
    assert a == C.parse_args(grpo.Args, ["--variant", "dapo", "--eps-high", "0.2", "--no-dynamic-sampling"])
    assert dataclasses.replace(a, lr=1e-6).eps_high == 0.2  # replace re-runs __post_init__ on set values


def test_bad_values_name_the_flag(capsys):
    with pytest.raises(ValueError, match="--dual-clip"):
        grpo.Args(dual_clip=0.5)
    with pytest.raises(ValueError, match="--variant"):
        grpo.Args(variant="ppo")
    with pytest.raises(ValueError, match="--eps-low"):
        C.TrainArgs(eps_low=1.0)
    with pytest.raises(SystemExit):  # the command line turns the ValueError into a usage error
        C.parse_args(grpo.Args, ["--dual-clip", "1.0"])
    assert "--dual-clip must be 0 (off) or > 1" in capsys.readouterr().err
    assert C.TrainArgs(dual_clip=3.0).dual_clip == 3.0


def test_a_field_left_unset_by_every_preset_is_an_error():
    @dataclasses.dataclass
    class Partial(C.TrainArgs):
        PRESETS = {"variant": {"a": {"k": 1}, "b": {}}}
        variant: str = "a"
        k: int | None = None
    assert Partial().k == 1
    with pytest.raises(ValueError, match="no value for --k"):
        Partial(variant="b")
