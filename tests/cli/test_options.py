"""The fusion flags and --config keys are FusionConfig's fields, and --print-config reads back."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from otfuse import cli
from otfuse.cli import options
from otfuse.config import FusionConfig, choices, field_names, option_fields

from .util import call, call_ok


def fuse_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["fuse"]


def test_every_option_field_is_a_flag_with_its_help():
    actions = {a.dest: a for a in fuse_parser()._actions}
    for f in option_fields():
        action = actions[f.name]
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")
        assert action.help.startswith(f.metadata["help"])
        assert action.default is None  # not given: the recipe decides
    assert "candidates" not in actions  # metadata cli=False: YAML only
    assert isinstance(actions["refine"], argparse.BooleanOptionalAction)


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        (["--stages", "bn_reset,repair,refit"], {"stages": ("bn_reset", "repair", "refit")}),
        (["--stages", "none"], {"stages": ()}),
        (["--weights", "1,2"], {"weights": (1.0, 2.0)}),
        (["--weights", "none"], {}),  # None: equal weights, the default
        (["--no-refine", "--to-average"], {"refine": False, "to_average": True}),
        (["--reg", "1e-3", "--num-samples", "64"], {"reg": 0.001, "num_samples": 64}),
        (["--mode", "acts", "--cost", "cosine"], {"mode": "acts", "cost": "cosine"}),
        (
            ["--synthesize", "auto", "--synthesis-steps", "12"],
            {"synthesize": "auto", "synthesis_steps": 12},
        ),
    ],
)
def test_flags_take_the_fields_types(flags, want):
    args = fuse_parser().parse_args(flags)
    assert options.given_options(args) == want


def test_literal_choices_come_from_the_annotations():
    for f in option_fields():
        allowed = choices(f.name)
        kind = options.kind_of(f.name)
        if f.name == "recipe":
            assert set(kind.base) <= set(allowed)
        elif allowed is not None:
            assert kind.base == allowed


def test_print_config_round_trips_through_config(work, monkeypatch, capsys):
    args = ["--data", "fashion-mnist", "--config", "good.yaml", "--mode", "wts", "--print-config"]
    out = call_ok(work, monkeypatch, capsys, "fuse", *args)
    printed = yaml.safe_load(out)
    assert list(printed) == list(field_names())  # every field, candidates included
    want = (
        FusionConfig.from_recipe("data")
        .replace(mode="acts", num_samples=20, weights=(1, 3), refine=True, stages=("bn_reset",))
        .replace(mode="wts")  # the flag overrides the file
    )
    assert FusionConfig(**printed) == want
    assert "# costs from incoming weights" in out  # each field's help
    (work / "printed.yaml").write_text(out)
    again = call_ok(work, monkeypatch, capsys, "fuse", "--config", "printed.yaml", "--print-config")
    assert FusionConfig(**yaml.safe_load(again)) == want  # without --data too: the file says all


def test_the_data_recipe_printed_keeps_its_candidates(work, monkeypatch, capsys):
    out = call_ok(work, monkeypatch, capsys, "fuse", "--data", "fashion-mnist", "--print-config")
    assert FusionConfig(**yaml.safe_load(out)) == FusionConfig.from_recipe("data")
    (work / "data.yaml").write_text(out)
    again = call_ok(work, monkeypatch, capsys, "fuse", "--config", "data.yaml", "--print-config")
    assert FusionConfig(**yaml.safe_load(again)) == FusionConfig.from_recipe("data")
    # a flag that sets the alignment drops the candidates, as FusionConfig.replace does
    out = call_ok(work, monkeypatch, capsys, "fuse", "--config", "data.yaml", "--cost", "cosine",
                  "--print-config")  # fmt: skip
    assert yaml.safe_load(out)["candidates"] == []


def test_config_values_are_checked_like_flags(work, monkeypatch, capsys):
    (work / "strings.yaml").write_text("reg: 1e-3\nstages: bn_reset,repair\nnum_samples: '30'\n")
    out = call_ok(work, monkeypatch, capsys, "fuse", "--config", "strings.yaml", "--print-config")
    printed = yaml.safe_load(out)
    assert printed["reg"] == 0.001 and printed["stages"] == ["bn_reset", "repair"]
    assert printed["num_samples"] == 30
    (work / "wrong.yaml").write_text("mode: fast\n")
    status, _, err = call(work, monkeypatch, capsys, "fuse", "--config", "wrong.yaml",
                          "--print-config")  # fmt: skip
    assert status == 2 and "mode" in err and "fast" in err


def test_class_counts_are_rows_on_the_command_line_and_in_a_file(work, monkeypatch, capsys):
    args = fuse_parser().parse_args(["--class-counts", "1,2;3,4"])
    assert options.given_options(args) == {"class_counts": ((1.0, 2.0), (3.0, 4.0))}
    rows = [[600] * 4 + [6000] + [600] * 5, [5400] * 4 + [0] + [5400] * 5]
    (work / "counts.json").write_text(json.dumps(rows))
    out = call_ok(work, monkeypatch, capsys, "fuse", "--data", "fashion-mnist", "--targets",
                  "coverage", "--class-counts", "@counts.json", "--print-config")  # fmt: skip
    (work / "coverage.yaml").write_text(out)
    again = call_ok(
        work, monkeypatch, capsys, "fuse", "--config", "coverage.yaml", "--print-config"
    )
    assert yaml.safe_load(again)["class_counts"] == rows


def test_class_counts_that_do_not_fit_fail_in_one_line_and_write_nothing(work, monkeypatch, capsys):
    status, _, err = call(work, monkeypatch, capsys, "fuse", "a.safetensors", "b.safetensors",
                          "--data", "fashion-mnist", "--num-samples", "40", "--targets", "coverage",
                          "--class-counts", "1,2;3,4", "-o", "counts_bad.safetensors")  # fmt: skip
    assert status != 0
    assert "class_counts has 2 column(s) but the models give 10 class scores" in err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("otfuse: error")
    assert not (work / "counts_bad.safetensors").exists()
    status, _, err = call(work, monkeypatch, capsys, "fuse", "--targets", "coverage",
                          "--class-counts", "@missing.json", "--print-config")  # fmt: skip
    assert status != 0
    assert "cannot read missing.json" in err
