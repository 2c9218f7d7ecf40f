"""Bad input: one line on stderr, the right exit status, no traceback, nothing written."""

from __future__ import annotations

import pytest

from .conftest import FAILURE_RUNS
from .util import ARCH, call, one_line_error, run_all

# id: (arguments, exit status, words the one-line error holds); fuse runs get -o out.safetensors
FAILURES = {
    "missing file": (["fuse", "a.safetensors", "gone.safetensors"], 1, ["gone.safetensors", "does not exist"]),
    "empty file": (["fuse", "a.safetensors", "empty.safetensors"], 1, ["empty"]),
    "truncated file": (["fuse", "a.safetensors", "truncated.safetensors"], 1, ["truncated"]),
    "corrupt file": (["fuse", "a.safetensors", "corrupt.pt"], 1, ["corrupt.pt"]),
    "not a checkpoint": (["fuse", "a.safetensors", "notes.txt"], 1, ["not a checkpoint"]),
    "pickle that runs code": (["fuse", "a.safetensors", "evil.pt"], 1, ["would run code"]),
    "keys/shapes do not fit ARCH": (
        ["fuse", "a.safetensors", "wide.safetensors", "--arch", ARCH], 1, ["wide.safetensors", "shape"]
    ),
    "models differ": (["fuse", "a.safetensors", "conv.safetensors"], 1, ["conv.safetensors and a.safetensors", "'features.3.weight'"]),
    "NaN weights": (["fuse", "a.safetensors", "nan.safetensors"], 1, ["NaN"]),
    "one model": (["fuse", "a.safetensors"], 2, ["at least two"]),
    "weights count": (["fuse", "a.safetensors", "b.safetensors", "--weights", "1,2,3"], 2, ["3 numbers for 2"]),
    "weights sum to zero": (["fuse", "a.safetensors", "b.safetensors", "--weights", "0,0"], 2, ["positive"]),
    "weights not numbers": (["fuse", "a.safetensors", "b.safetensors", "--weights", "1,x"], 2, ["--weights"]),
    "acts without data": (["fuse", "a.safetensors", "b.safetensors", "--recipe", "paper-acts"], 2, ["mode acts", "recipe 'paper-acts'", "--data", "--synthesize"]),
    "recipe needs data": (["fuse", "a.safetensors", "b.safetensors", "--recipe", "data"], 2, ["recipe 'data'", "--data"]),
    "stages need data": (["fuse", "a.safetensors", "b.safetensors", "--recipe", "paper-wts", "--stages", "bn_reset"], 2, ["stages bn_reset needs data"]),
    "eval without data": (["fuse", "a.safetensors", "b.safetensors", "--eval"], 2, ["--data"]),
    "anchor out of range": (["fuse", "a.safetensors", "b.safetensors", "--anchor", "2"], 2, ["anchor"]),
    "unknown option": (["fuse", "a.safetensors", "b.safetensors", "--bogus"], 2, ["--bogus"]),
    "unknown choice": (["fuse", "a.safetensors", "b.safetensors", "--solver", "magic"], 2, ["--solver", "magic"]),
    "unknown stage": (["fuse", "a.safetensors", "b.safetensors", "--stages", "bn_reset,polish"], 2, ["--stages", "polish"]),
    "repeated stage": (["fuse", "a.safetensors", "b.safetensors", "--stages", "repair,repair"], 2, ["repeat"]),
    "negative synthesis count": (["fuse", "a.safetensors", "b.safetensors", "--synthesize", "-1"], 2, ["synthesize", "0 or more"]),
    "unknown zoo name": (["fuse", "a.safetensors", "b.safetensors", "--arch", "resnet9000"], 2, ["resnet9000"]),
    "bad zoo argument": (["fuse", "plain.pt", "plain.pt", "--arch", "mlpnet:depth=3"], 2, ["--arch mlpnet:depth=3", "depth"]),
    "in-shape with a separator too many": (["fuse", "a.safetensors", "b.safetensors", "--in-shape", "1x28x28x"], 2, ["1x28x28x", "not a shape"]),
    "no architecture recorded": (["fuse", "plain.pt", "plain.pt"], 2, ["--arch"]),
    "recorded callable is not imported": (["fuse", "rec16.safetensors", "rec12.safetensors"], 2, ["--arch usernet:make_net:width=16"]),
    "--arch once per checkpoint": (
        ["fuse", "a.safetensors", "b.safetensors", "--arch", ARCH, "--arch", ARCH, "--arch", ARCH], 2, ["3 times for 2"]
    ),
    "module cannot be imported": (
        ["fuse", "a.safetensors", "b.safetensors", "--arch", "no_such_pkg.models:make"], 1, ["cannot import"]
    ),
    "callable without input shape": (
        ["fuse", "user_a.safetensors", "user_b.safetensors", "--arch", "usernet:make_net"], 2, ["--in-shape"]
    ),
    "wrong input shape": (
        ["fuse", "a.safetensors", "b.safetensors", "--in-shape", "3x5x5"], 1, ["does not accept inputs of shape 3x5x5", "records inputs of shape 1x28x28"]
    ),
    "input shape contradicts data": (
        ["fuse", "a.safetensors", "b.safetensors", "--in-shape", "3x5x5", "--data", "own.pt"], 2, ["--in-shape 3x5x5", "1x28x28"]
    ),
    "inspect with a wrong input shape": (["inspect", "a.safetensors", "--in-shape", "2x7"], 1, ["does not accept inputs of shape 2x7"]),
    "output exists": (["fuse", "a.safetensors", "b.safetensors", "-o", "existing.safetensors"], 1, ["--force"]),
    "format contradicts suffix": (
        ["fuse", "a.safetensors", "b.safetensors", "-o", "x.pt", "--format", "safetensors"], 2, ["suffix"]
    ),
    "output cannot be written": (
        ["fuse", "a.safetensors", "b.safetensors", "-o", "notes.txt/fused.safetensors"], 1, ["cannot write", "not a folder"]
    ),
    "config with an unknown option": (
        ["fuse", "a.safetensors", "b.safetensors", "--config", "bad.yaml"], 2, ["mdoe"]
    ),
    "missing config": (["fuse", "a.safetensors", "b.safetensors", "--config", "nope.yaml"], 2, ["nope.yaml"]),
    "no command": ([], 2, ["COMMAND"]),
    "unknown command": (["fusion"], 2, ["fusion"]),
    "eval needs --data": (["eval", "a.safetensors"], 2, ["--data"]),
    "unknown dataset": (["eval", "a.safetensors", "--data", "imagenet"], 1, ["imagenet", ".npy"]),
    "dataset files missing": (["eval", "conv.safetensors", "--data", "cifar10"], 1, ["--data-dir"]),
    "model does not fit the data": (
        ["eval", "user_a.safetensors", "--arch", "usernet:make_net", "--data", "fashion-mnist"], 1, ["does not accept fashion-mnist images"]
    ),
    "own data does not fit the model": (["fuse", "a.safetensors", "b.safetensors", "--data", "small.pt"], 1, ["does not accept the inputs of small.pt of shape 3x8x8"]),
    "own data without labels": (["eval", "a.safetensors", "--data", "own.npy"], 1, ["own.npy holds no labels", "--labels"]),
    "labels of the wrong length": (["eval", "a.safetensors", "--data", "own.npy", "--labels", "short_labels.npy"], 1, ["short_labels.npy holds 5 labels for the 300 inputs of own.npy"]),
    "NaN inputs": (["fuse", "a.safetensors", "b.safetensors", "--data", "nan.npy"], 1, ["NaN"]),
    "pickled numpy objects": (["eval", "a.safetensors", "--data", "objects.npy"], 1, ["Python objects"]),
    "truncated data file": (["eval", "a.safetensors", "--data", "broken.pt"], 1, ["broken.pt", "cannot be read"]),
    "unknown data file": (["eval", "a.safetensors", "--data", "notes.txt"], 1, ["unknown kind of input file"]),
    "missing data file": (["eval", "a.safetensors", "--data", "gone.npy"], 1, ["gone.npy does not exist"]),
    "labels for a named dataset": (["eval", "a.safetensors", "--data", "fashion-mnist", "--labels", "own_labels.npy"], 2, ["--labels"]),
    "bad normalisation": (["eval", "a.safetensors", "--data", "imgs", "--normalize", "mean=0.5"], 2, ["--normalize"]),
    "train on own data": (["train", "--arch", ARCH, "--data", "own.pt", "-o", "t.safetensors"], 2, ["named dataset"]),
    "train output exists": (
        ["train", "--arch", ARCH, "--data", "fashion-mnist", "-o", "existing.safetensors"], 1, ["exists"]
    ),
    "interpolate different architectures": (
        ["interpolate", "a.safetensors", "conv.safetensors", "--data", "fashion-mnist", "-o", "ipath"], 1, ["different parameters"]
    ),
    "interpolate without labels": (
        ["interpolate", "a.safetensors", "b.safetensors", "--data", "own.npy", "-o", "ipath"], 1, ["no labels", "interpolate"]
    ),
}  # fmt: skip


def failure_args(case: str) -> list[str]:
    args = FAILURES[case][0]
    if args[:1] == ["fuse"] and "-o" not in args:
        args = [*args, "-o", "out.safetensors"]
    return args


def assert_refused(work, case: str, status: int, stdout: str, stderr: str) -> None:
    """The exit status of ``case``; one error line holding its words; nothing on stdout or disk."""
    assert status == FAILURES[case][1], (status, stderr)
    one_line_error(stderr, *FAILURES[case][2])
    assert stdout == ""
    assert not (work / "out.safetensors").exists()


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_input_is_one_line_and_writes_nothing(work, case, monkeypatch, capsys):
    assert_refused(work, case, *call(work, monkeypatch, capsys, *failure_args(case)))


@pytest.mark.parametrize("case", list(FAILURE_RUNS))
def test_bad_input_through_the_real_command_line(work, results, case):
    proc = results[case]
    assert_refused(work, case, proc.returncode, proc.stdout, proc.stderr)


def test_a_wrong_input_shape_is_one_line_not_a_torch_traceback(work, results):
    proc = results["wrong in-shape"]
    assert proc.returncode == 1
    line = one_line_error(proc.stderr, "does not accept inputs of shape 3x5x5", "--in-shape")
    assert "mat1 and mat2" in line  # the cause, in a word
    assert proc.stdout == ""


@pytest.mark.slow
def test_every_bad_input_through_the_real_command_line(work):
    procs = run_all(work, {k: failure_args(k) for k in FAILURES})
    for case, proc in procs.items():
        assert_refused(work, case, proc.returncode, proc.stdout, proc.stderr)


def test_failures_leave_no_partial_files(work, results):
    assert (work / "existing.safetensors").read_bytes() == b"keep me"
    assert not list(work.glob(".*tmp*")), "a temporary file was left behind"
    assert not (work / "pwned").exists(), "the malicious pickle ran"
    assert not (work / "ipath").exists()
    for name in ("never.safetensors", "x.pt", "t.safetensors", "diverged.safetensors"):
        assert not (work / name).exists()
