"""A hostile but fair user: damaged model folders, random flag values, bad paths, a full disk and a read-only
folder. Every case must end in exit 0 or exit 2 with ONE ``error:`` line on stderr (the last one), never a
traceback; with ``--json`` the error is also one JSON document ``{"error", "fix"}`` on stdout.

Property-based where it fits (hypothesis, few examples, no deadline); everything runs in-process through
``transferkit.cli.main.main`` on a tiny small_cnn run, so the file takes well under a minute.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit.cli.main import main

SMALL = ["--backbone", "small_cnn", "--epochs", "1", "--batch-size", "8", "--no-progress"]
EXAMPLES = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("isolated_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    for cls, axis in (("horizontal", 0), ("vertical", 1)):
        (root / cls).mkdir()
        for i in range(6):
            image = rng.integers(0, 60, (28, 28)).astype(np.uint8)
            if axis == 0:
                image[::4, :] = 255
            else:
                image[:, ::4] = 255
            Image.fromarray(image).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def image_file(image_folder) -> Path:
    return image_folder / "vertical" / "0.png"


@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "stripes"
    os.environ["TRANSFERKIT_PROGRESS"] = "0"
    assert main(["-q", "fit", "--data", str(image_folder), *SMALL, "--out", str(out)]) == 0
    return out


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *, as_json: bool = False, contains: str = "") -> str:
    """Exit 2, no traceback, exactly one ``error:`` line and it is the last line of stderr (argparse errors may
    put one short ``usage:`` line before it); returns that line."""
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-2000:]
    assert not [line for line in lines if line.startswith("usage:") and len(line) > 300], err
    assert contains.lower() in errors[0].lower(), errors[0]
    if as_json:
        document = json.loads(out)  # exactly one JSON document on stdout
        assert set(document) == {"error", "fix"} and document["error"] and document["fix"], document
    return errors[0]


def assert_exit_0_or_one_line(code: int, out: str, err: str, *, as_json: bool = False) -> None:
    assert code in (0, 2), (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if code == 2:
        assert_one_line_error(code, out, err, as_json=as_json)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- every command refuses non-positive counts, one line --------------------------------------------------------


def _refused_count_cases(tmp: Path, run: Path, image: Path, data: Path) -> list[list[str]]:
    missing = tmp / "missing"
    return [
        ["evaluate", "--model", run, "--data", data, "--batch-size", "0"],
        ["predict", "--model", run, image, "--batch-size", "0"],
        ["predict", "--model", run, image, "--top", "0"],
        ["fit", "--data", data, *SMALL, "--batch-size", "0", "--out", tmp / "f"],
        ["fit", "--data", data, "--backbone", "small_cnn", "--epochs", "0", "--out", tmp / "f"],
        ["compare", "--data", data, "--backbones", "small_cnn", "--strategies", "linear-probe", "--out", tmp / "c",
         "--batch-size", "0"],
        ["compare", "--data", data, "--backbones", "small_cnn", "--strategies", "linear-probe", "--out", tmp / "c",
         "--seeds", "0"],
        ["index", "build", "--docs", data, "--out", tmp / "i", "--batch-size", "0"],
        ["index", "build", "--docs", data, "--out", tmp / "i", "--chunk-size", "0"],
        ["index", "add", missing, data, "--batch-size", "0"],
        ["search", missing, "query", "-k", "0"],
        ["ask", missing, "question", "-k", "0"],
        ["zeroshot", image, "--labels", "a,b", "--conse-top", "0"],
        ["prompt", "--data", data, "--limit", "0"],
        ["seq2seq", "train", "--task", "binary-to-decimal", "--out", tmp / "s", "--batch-size", "0"],
        ["seq2seq", "train", "--task", "binary-to-decimal", "--out", tmp / "s", "--epochs", "-1"],
        ["seq2seq", "predict", "--model", missing, "101", "--beam-size", "0"],
        ["charlm", "train", image, "--out", tmp / "l", "--batch-size", "0"],
        ["charlm", "sample", "--model", missing, "--length", "0"],
        ["charlm", "sample", "--model", missing, "--top-k", "-1"],
        ["generate", "--backbone", "smollm2-135m", "hi", "--max-new-tokens", "0"],
        ["rank-backbones", "--data", data, "--limit-per-class", "0"],
        ["check", "--data", data, "--test-limit", "0"],
        ["demo", "--out", tmp / "d", "--limit-per-class", "0"],
        ["data", "export", "digits", tmp / "e", "--limit-per-class", "0"],
        ["inspect", "small_cnn", "--depth", "-1"],
    ]


def test_every_command_refuses_non_positive_counts(trained_run, image_file, image_folder, tmp_path, capsys):
    """issue 13: `--batch-size 0` on evaluate / predict / ... printed a traceback (fit refused it, they did not)."""
    work = tmp_path / "work"
    work.mkdir()
    for args in _refused_count_cases(work, trained_run, image_file, image_folder):
        code, out, err = run_cli([*args, *(["--json"] if args[0] in ("evaluate", "predict", "search") else [])],
                                 capsys)
        assert_one_line_error(code, out, err, as_json=args[0] in ("evaluate", "predict", "search"))
    assert list(work.iterdir()) == []  # refused before anything was written


def test_argument_errors_print_one_short_usage_line(capsys):
    """issue 13: an invalid integer printed 61 lines of usage before the error."""
    for args, flag in ((["fit", "--data", "digits", "--epochs", "abc"], "--epochs"),
                       (["evaluate", "--model", "m", "--data", "d", "--bogus"], "--bogus"),
                       (["index", "build", "--out", "x"], "--docs")):
        code, out, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 2 and lines[0].startswith("usage: transferkit ") and len(lines[0]) < 200
        assert_one_line_error(code, out, err, contains=flag)
    code, out, err = run_cli(["predict", "--model", "m", "x.png", "--top", "many", "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True, contains="--top")


# --- errors with --json -----------------------------------------------------------------------------------------


def test_json_errors_are_one_document_on_stdout(trained_run, image_folder, tmp_path, capsys):
    for args in (["evaluate", "--model", tmp_path / "none", "--data", image_folder],
                 ["predict", "--model", trained_run, tmp_path / "none.png"],
                 ["search", tmp_path / "none", "query"],
                 ["index", "info", tmp_path / "none"],
                 ["check", "--data", tmp_path / "none"]):
        code, out, err = run_cli([*args, "--json"], capsys)
        assert_one_line_error(code, out, err, as_json=True)
        assert json.loads(out)["error"] in err


# --- model folders are validated on load ------------------------------------------------------------------------


def _edit_config(run: Path, edit) -> None:
    path = run / "model" / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("name, edit, expected", [
    ("image_size 0", lambda c: c["backbone"]["options"].update(image_size=0), "image_size"),
    ("image_size huge", lambda c: c["backbone"]["options"].update(image_size=100000), "image_size"),
    ("class list shorter than the head", lambda c: c["tasks"][0]["class_names"].pop(), "classes for a head"),
    ("unknown backbone", lambda c: c["backbone"].update(name="resnet9000"), "unknown backbone"),
    ("a width of 10^5", lambda c: c["backbone"]["options"].update(width=10**5), "do not fit"),  # 720 GB: not allocated
    ("unknown frame", lambda c: c["backbone"]["options"].update(frame="square"), "unknown frame 'square'"),
    ("no tasks", lambda c: c.pop("tasks"), "no tasks"),
    ("format_version text", lambda c: c.update(format_version="one"), "format_version"),
    ("tasks not a list", lambda c: c.update(tasks={"a": 1}), "no tasks"),
])
def test_edited_model_config_is_refused_naming_the_folder(name, edit, expected, trained_run, image_file, tmp_path,
                                                          capsys):
    """issue 13: a config.json with image_size 0 was used silently; a class list shorter than the head crashed."""
    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    _edit_config(broken, edit)
    code, out, err = run_cli(["predict", "--model", broken, image_file, "--json"], capsys)
    line = assert_one_line_error(code, out, err, as_json=True, contains=expected)
    assert str(broken) in line


@pytest.mark.parametrize("damage", ["truncate", "flip", "nan", "dtype", "delete"])
def test_damaged_weights_are_refused(damage, trained_run, image_file, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    weights = broken / "model" / "model.safetensors"
    raw = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # a bit in the middle of a tensor: the file still parses
        weights.write_bytes(raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x10]) + raw[len(raw) // 2 + 1:])
    elif damage in ("nan", "dtype"):
        state = load_file(str(weights))
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].double() if damage == "dtype" else torch.full_like(state[key], float("nan"))
        save_file(state, str(weights))
        _edit_config(broken, lambda c: c.pop("weights_sha256"))  # as if the folder predated the checksum
    else:
        weights.unlink()
    code, out, err = run_cli(["evaluate", "--model", broken, "--data", image_file.parent.parent, "--json"], capsys)
    line = assert_one_line_error(code, out, err, as_json=True)
    assert str(broken) in line


def _corrupt(data, raw: bytes) -> bytes:
    how = data.draw(st.sampled_from(["truncate", "flip", "garbage", "empty", "splice"]), label="how")
    if how == "truncate":
        return raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="keep")]
    if how == "flip":
        position = data.draw(st.integers(0, len(raw) - 1), label="position")
        return raw[:position] + bytes([raw[position] ^ data.draw(st.integers(1, 255), label="mask")]) + \
            raw[position + 1:]
    if how == "garbage":
        return data.draw(st.binary(min_size=1, max_size=200), label="garbage")
    if how == "empty":
        return b""
    position = data.draw(st.integers(0, len(raw)), label="position")
    return raw[:position] + data.draw(st.binary(min_size=1, max_size=50), label="inserted") + raw[position:]


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**9, 10**9) |
                           st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)
CONFIG_PATHS = [("format_version",), ("backbone", "name"), ("backbone", "options"), ("backbone", "options", "width"),
                ("backbone", "options", "image_size"), ("backbone", "options", "in_chans"), ("tasks",),
                ("tasks", 0, "class_names"), ("tasks", 0, "num_outputs"), ("tasks", 0, "kind"), ("tasks", 0, "name"),
                ("head_dropout",), ("strategy",), ("strategy", "name"), ("strategy", "options"), ("modality",)]


@EXAMPLES
@given(data=st.data())
def test_random_damage_to_a_model_folder_never_crashes(data, trained_run, image_file, tmp_path_factory, capsys):
    broken = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(trained_run, broken)
    target = data.draw(st.sampled_from(["config.json", "model.safetensors", "config value"]), label="target")
    if target == "config value":
        path = data.draw(st.sampled_from(CONFIG_PATHS), label="key")
        value = data.draw(JSON_VALUES, label="value")

        def edit(config):
            parent = config
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value

        _edit_config(broken, edit)
    else:
        file = broken / "model" / target
        raw = file.read_bytes()
        damaged = _corrupt(data, raw)
        file.write_bytes(damaged)
    code, out, err = run_cli(["predict", "--model", broken, image_file, "--json"], capsys)
    assert_exit_0_or_one_line(code, out, err, as_json=True)
    if target == "model.safetensors" and damaged != raw:
        assert code == 2  # any change to the weights is caught (the checksum in config.json)
    if code == 0:
        probabilities = json.loads(out)["predictions"][0]["probabilities"]
        assert abs(sum(probabilities.values()) - 1) < 1e-4


# --- random flag values for every command's numeric options -----------------------------------------------------

FLAG_VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "abc", "", "0x10", "1.5", " 3", "-0", "1_000", "²", "+2"]),
)


def _numeric_cases(tmp: Path, run: Path, image: Path, data: Path) -> list[tuple[list, str]]:
    """(command, flag): with a valid value each command either runs cheaply or stops at a missing input."""
    missing = tmp / "missing"
    return [
        (["evaluate", "--model", run, "--data", data, "--json"], "--batch-size"),
        (["evaluate", "--model", run, "--data", data, "--attack", "fgsm", "--json"], "--epsilon"),
        (["predict", "--model", run, image, "--json"], "--batch-size"),
        (["predict", "--model", run, image, "--json"], "--top"),
        *[(["fit", "--data", missing, "--backbone", "small_cnn", "--out", tmp / "f"], flag)
          for flag in ("--epochs", "--batch-size", "--lr", "--image-size", "--limit-per-class", "--val-fraction",
                       "--head-dropout", "--weight-decay", "--warmup-steps", "--seed")],
        *[(["compare", "--data", missing, "--backbones", "small_cnn", "--strategies", "linear-probe",
            "--no-isolate", "--out", tmp / "c", "--json"], flag)
          for flag in ("--seeds", "--time-budget", "--cost-ratio", "--batch-size", "--epochs")],
        *[(["charlm", "train", missing, "--out", tmp / "l"], flag)
          for flag in ("--epochs", "--batch-size", "--bptt", "--hidden-size", "--dropout", "--lr")],
        *[(["seq2seq", "train", "--pairs", missing, "--out", tmp / "s"], flag)
          for flag in ("--bits", "--train-fraction", "--val-fraction", "--epochs", "--attention-heads")],
        (["seq2seq", "predict", "--model", missing, "101"], "--beam-size"),
        *[(["charlm", "sample", "--model", missing], flag)
          for flag in ("--length", "--temperature", "--top-k", "--seed")],
        (["search", missing, "query", "--json"], "-k"),
        (["ask", missing, "question", "--json"], "-k"),
        (["zeroshot", missing.with_suffix(".png"), "--labels", "a,b", "--json"], "--conse-top"),
        (["prompt", "--data", missing, "--json"], "--limit"),
        *[(["check", "--data", missing, "--json"], flag)
          for flag in ("--threshold", "--limit-per-class", "--test-limit", "--image-size")],
        (["rank-backbones", "--data", missing, "--json"], "--limit-per-class"),
        (["generate", "--model", missing, "hi"], "--max-new-tokens"),
        (["generate", "--model", missing, "hi"], "--temperature"),
        (["inspect", "small_cnn", "--json"], "--depth"),
        (["data", "export", "no-such-data", tmp / "e"], "--limit-per-class"),
    ]


@EXAMPLES
@given(data=st.data())
def test_random_flag_values_exit_0_or_2_with_one_line(data, trained_run, image_file, image_folder,
                                                      tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("flags")
    args, flag = data.draw(st.sampled_from(_numeric_cases(tmp, trained_run, image_file, image_folder)),
                           label="command")
    value = data.draw(FLAG_VALUES, label="value")
    code, out, err = run_cli([*args, f"{flag}={value}"], capsys)
    assert_exit_0_or_one_line(code, out, err, as_json="--json" in args)


# --- bad paths ---------------------------------------------------------------------------------------------------


def _path_kinds(tmp: Path, image: Path) -> dict[str, Path]:
    a_file = tmp / "a-file.txt"
    a_file.write_text("not what you think\n")
    not_a_run = tmp / "not-a-run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine\n")
    return {"missing": tmp / "missing", "a file": a_file, "under a file": a_file / "sub",
            "a folder that is not ours": not_a_run, "an image": image}


PATH_COMMANDS = [
    lambda p, run, img, data: ["evaluate", "--model", p, "--data", data, "--json"],
    lambda p, run, img, data: ["evaluate", "--model", run, "--data", p, "--json"],
    lambda p, run, img, data: ["predict", "--model", p, img, "--json"],
    lambda p, run, img, data: ["predict", "--model", run, p, "--json"],
    lambda p, run, img, data: ["predict", "--model", run, img, "--csv", p / "preds.csv"],
    lambda p, run, img, data: ["fit", "--data", p, "--backbone", "small_cnn", "--out", p.parent / "fit-out"],
    lambda p, run, img, data: ["index", "info", p, "--json"],
    lambda p, run, img, data: ["search", p, "query", "--json"],
    lambda p, run, img, data: ["charlm", "sample", "--model", p],
    lambda p, run, img, data: ["seq2seq", "predict", "--model", p, "101"],
    lambda p, run, img, data: ["report", p],
    lambda p, run, img, data: ["export", "--model", p, "--out", p.parent / "export-out"],
    lambda p, run, img, data: ["check", "--data", p, "--json"],
    lambda p, run, img, data: ["zeroshot", p, "--labels", "a,b", "--json"],
    lambda p, run, img, data: ["charlm", "train", p, "--out", p.parent / "lm-out", "--epochs", "1"],
    lambda p, run, img, data: ["seq2seq", "train", "--pairs", p, "--out", p.parent / "s2s-out"],
]


@EXAMPLES
@given(data=st.data())
def test_bad_paths_exit_2_with_one_line(data, trained_run, image_file, image_folder, tmp_path_factory, capsys):
    tmp = tmp_path_factory.mktemp("paths")
    kinds = _path_kinds(tmp, image_file)
    kind = data.draw(st.sampled_from(sorted(set(kinds) - {"an image"})), label="path")
    command = data.draw(st.sampled_from(PATH_COMMANDS), label="command")
    args = command(kinds[kind], trained_run, image_file, image_folder)
    code, out, err = run_cli(args, capsys)
    assert_exit_0_or_one_line(code, out, err, as_json="--json" in args)
    assert (kinds["a folder that is not ours"] / "notes.txt").read_text() == "mine\n"  # nothing of ours deleted
    assert kinds["a file"].read_text() == "not what you think\n"


def test_out_that_is_a_file_or_the_working_folder(image_folder, tmp_path, capsys, monkeypatch):
    """issue 13: `--out` naming an existing file printed a traceback."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, out, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", a_file, "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True)
    assert a_file.read_text() == "x"


def test_absurd_image_size_is_refused_before_any_work(image_folder, tmp_path, capsys):
    """issue 13: `fit --image-size 100000` ran out of memory (MemoryError, or the kernel killed it)."""
    code, out, err = run_cli(["fit", "--data", image_folder, *SMALL, "--image-size", "100000", "--out",
                              tmp_path / "r"], capsys)
    assert_one_line_error(code, out, err, contains="--image-size")
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()
    code, out, err = run_cli(["check", "--data", image_folder, "--image-size", "100000"], capsys)
    assert_one_line_error(code, out, err, contains="--image-size")


# --- silent wrong answers -----------------------------------------------------------------------------------------


def test_zeroshot_clip_without_weights_is_refused(image_file, capsys):
    """issue 13: `zeroshot --method clip` without --clip-pretrained ran on random weights and exited 0."""
    code, out, err = run_cli(["zeroshot", image_file, "--labels", "cat,dog", "--method", "clip", "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True, contains="--clip-pretrained")


def test_compare_with_no_trained_cell_exits_2_without_a_report(tmp_path, capsys):
    """issue 13: `compare` on missing data exited 0 and wrote a report of failed cells."""
    out_dir = tmp_path / "cmp"
    code, out, err = run_cli(["compare", "--data", tmp_path / "no-data", "--backbones", "small_cnn",
                              "--strategies", "linear-probe,finetune", "--seeds", "3", "--no-isolate", "--out", out_dir,
                              "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True, contains="no cell of the comparison trained")
    assert "2 failed" in err  # stopped after every configuration failed once, not after all six cells
    assert not (out_dir / "leaderboard.json").exists() and not (out_dir / "report.html").exists()


@pytest.mark.parametrize("threshold", ["2", "0", "-0.5", "nan"])
def test_check_threshold_outside_its_range_is_refused(threshold, image_folder, capsys):
    """issue 13: `check --threshold 2` was accepted (and could never find a duplicate)."""
    code, out, err = run_cli(["check", "--data", image_folder, "--threshold", threshold, "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True, contains="--threshold")


def test_check_data_api_refuses_a_threshold_above_one():
    from transferkit.errors import TransferkitError
    from transferkit.evaluation.datacheck import check_data

    with pytest.raises(TransferkitError, match="threshold"):
        check_data(None, threshold=2.0)


# --- rejected input to the sequence commands leaves nothing behind ----------------------------------------------


SEQ_SMALL = ["--epochs", "1", "--hidden-size", "8", "--embedding-dim", "4", "--batch-size", "8", "--no-progress"]


def test_rejected_charlm_and_seq2seq_input_does_not_block_the_next_run(tmp_path, capsys):
    """issue 13: rejected input to `charlm train` / `seq2seq train` left a staging folder that blocked the next
    valid run."""
    short = tmp_path / "short.txt"
    short.write_text("too short " * 25, encoding="utf-8")  # 250 characters: too few for 200 streams of windows
    out = tmp_path / "lm"
    code, _, err = run_cli(["charlm", "train", short, "--out", out, *SEQ_SMALL, "--batch-size", "200"], capsys)
    assert_one_line_error(code, "", err, contains="too short")
    assert not out.exists() and not (tmp_path / ".lm.partial").exists()
    code, _, err = run_cli(["charlm", "train", short, "--out", out, *SEQ_SMALL, "--bptt", "5"], capsys)
    assert code == 0, err

    out = tmp_path / "b2d"
    for rejected, reason in ((["--bits", "6", "--attention", "multihead", "--attention-heads", "3"], "heads"),
                             (["--bits", "4"], "never occur in the training pairs")):  # '0' only in test targets
        code, _, err = run_cli(["seq2seq", "train", "--task", "binary-to-decimal", "--out", out, *SEQ_SMALL,
                                *rejected], capsys)
        assert_one_line_error(code, "", err, contains=reason)
        assert not out.exists() and not (tmp_path / ".b2d.partial").exists()
    code, _, err = run_cli(["seq2seq", "train", "--task", "binary-to-decimal", "--bits", "6", "--out", out,
                            *SEQ_SMALL, "--attention", "multihead", "--attention-heads", "4"], capsys)
    assert code == 0, err


# --- a full disk and a read-only folder ---------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]) if args else None)


def test_injected_disk_full_during_fit_leaves_the_existing_run_byte_identical(trained_run, image_folder, tmp_path,
                                                                              capsys, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
    code, out, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", run, "--overwrite", "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True, contains="disk is full")
    assert snapshot(run) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (a real full disk) where the machine allows mounting one (root), else the test is skipped."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected ENOSPC test covers this")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_real_full_disk_during_fit_leaves_runs_byte_identical(small_disk, image_folder, capsys):
    run = small_disk / "run"
    code, _, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", run], capsys)
    assert code == 0, err
    before = snapshot(run)
    _fill(small_disk, leave=200_000)  # room for the small files, not for the 1.2 MB weights
    code, out, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", run, "--overwrite", "--json"], capsys)
    assert_one_line_error(code, out, err, as_json=True, contains="disk is full")
    assert snapshot(run) == before
    (small_disk / "filler").unlink()
    code, _, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", run, "--overwrite"], capsys)
    assert code == 0, err  # whatever the failed run left behind does not block the next one


def test_read_only_folder_is_one_line(image_folder, trained_run, image_file, tmp_path, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        code, out, err = run_cli(["fit", "--data", image_folder, *SMALL, "--out", read_only / "run", "--json"],
                                 capsys)
        assert_one_line_error(code, out, err, as_json=True, contains="read-only")
        code, out, err = run_cli(["predict", "--model", trained_run, image_file, "--csv", read_only / "p.csv"],
                                 capsys)
        assert_one_line_error(code, out, err, contains="read-only")
    finally:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True)


def test_a_run_that_diverges_after_its_first_checkpoint_does_not_block_the_next_run(tmp_path, capsys, monkeypatch):
    """issue 13: NaN losses left a staging folder that blocked the next valid run (here the loss turns NaN in
    epoch 2, after epoch 1's checkpoint was written)."""
    import torch

    import transferkit.sequence.charlm as charlm
    from transferkit.sequence.training import SequenceCrossEntropy

    validated = []
    original_metrics, original_forward = charlm.language_model_metrics, SequenceCrossEntropy.forward

    def count_validation(*args, **kwargs):
        validated.append(1)
        return original_metrics(*args, **kwargs)

    def nan_after_first_epoch(self, model, batch, outputs):
        loss = original_forward(self, model, batch, outputs)
        return loss * torch.tensor(float("nan")) if validated else loss

    monkeypatch.setattr(charlm, "language_model_metrics", count_validation)
    monkeypatch.setattr(SequenceCrossEntropy, "forward", nan_after_first_epoch)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 40, encoding="utf-8")
    out = tmp_path / "lm"
    args = ["charlm", "train", text, "--out", out, *SEQ_SMALL, "--epochs", "2", "--bptt", "8", "--early-stopping", "0"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, "", err, contains="loss became nan at epoch 2")
    assert not out.exists() and not (tmp_path / ".lm.partial").exists()
    monkeypatch.setattr(SequenceCrossEntropy, "forward", original_forward)
    code, _, err = run_cli([*args, "--lr", "0.001"], capsys)  # the next run, with other options, is not blocked
    assert code == 0, err


@pytest.mark.parametrize("content", ["{", "[]", '{"evaluation": 3}', "\udcff".encode("utf-8", "surrogatepass")])
def test_report_of_a_damaged_run_folder_is_one_line(content, trained_run, tmp_path, capsys):
    broken = tmp_path / "run"
    shutil.copytree(trained_run, broken)
    metrics = broken / "metrics.json"
    metrics.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = run_cli(["report", broken], capsys)
    line = assert_one_line_error(code, out, err)
    assert str(metrics) in line


def test_a_bug_is_one_line_with_exit_1_and_its_traceback_with_v(monkeypatch, capsys):
    import transferkit.cli.catalog as catalog

    def broken(args):
        raise ZeroDivisionError("a programming error")

    monkeypatch.setattr(catalog, "run_backbones", broken)
    code, out, err = run_cli(["backbones", "--json"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bug in transferkit" in err and json.loads(out)["error"].startswith("internal error")
    code, _, err = run_cli(["-v", "backbones"], capsys)
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err
