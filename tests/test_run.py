"""``make run`` (tools/run.py): checks before Flower starts, then a real run.

The fast tests call the launcher in-process and never start Flower or Ray; the
``e2e`` ones run ``python -m tools.run`` as a user would (Flower, Ray, a private
SuperLink) and check the exit code, the results and that nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.datasets.cache import CACHE_DIRNAME
from tests.conftest import SHARED_DATA
from tests.helpers import write_learnable_imagefolder
from tools import run as launcher
from tools.superlink import APP


def image_folder(root: Path) -> Path:
    """A small image folder the launcher decodes (imagefolder, 2 classes)."""
    return write_learnable_imagefolder(root, 2, 3)


def main(capsys, *args: str) -> tuple[int, str, str]:
    code = launcher.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def data(tmp_path) -> list[str]:
    """Options pointing at a present dataset and a results folder under tmp_path."""
    folder = image_folder(tmp_path / "data")
    return [
        "--data-dir",
        str(folder),
        "--results-dir",
        str(tmp_path / "results"),
        "--run-config",
    ]


def overrides(data: list[str], text: str) -> list[str]:
    return [*data, "dataset='imagefolder' " + text]


@pytest.fixture(autouse=True)
def no_flower(monkeypatch):
    """The fast tests must stop before anything starts."""

    def refuse(launch):
        raise AssertionError(f"execute() reached with {launch}")

    monkeypatch.setattr(launcher, "execute", refuse)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models='transformer'", "run-config key 'models' = 'transformer' is not"),
        ("foo=1", "unknown run-config key 'foo'; allowed keys: batch-size"),
        ("seeed=1", "did you mean 'seed'?"),
        ("strategy=local", "key 'strategy' = local is not allowed: not a TOML value;"),
        ("models=cnn,vgg8", "quote a string: models='cnn,vgg8'"),
        ("num-server-rounds=0", "'num-server-rounds' = 0 is not allowed"),
        ("strategy='nope'", "unknown strategy; allowed: "),
        ("bogus num-server-rounds=2", "cannot read 'bogus'"),
        ("min-clients=11", "'min-clients' = 11 is not allowed with 10 clients"),
        ("resume-from='nowhere'", "'resume-from' = 'nowhere' is not allowed"),
        ("hypernet-from='nowhere'", "'hypernet-from' = 'nowhere' is not allowed"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(capsys, data, text, expected):
    code, out, err = main(capsys, *overrides(data, text))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err


def test_a_garbage_checkpoint_fails_in_the_launcher(capsys, data, tmp_path):
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"not a checkpoint")
    code, out, err = main(capsys, *overrides(data, f"resume-from='{garbage}'"))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert f"checkpoint {garbage} cannot be read (" in err
    assert "weights_only" not in err  # torch's advice would run the file's code


def test_missing_data_is_one_message_and_no_folder_is_left(capsys, tmp_path):
    missing = tmp_path / "missing"
    code, out, err = main(
        capsys, "--data-dir", str(missing), "--run-config", "download=false"
    )
    assert code == 2 and out == ""
    assert err.count("Dataset 'cifar10' not found") == 1
    assert str(missing) in err and "Traceback" not in err
    assert not missing.exists()


def test_data_is_decoded_before_flower_and_a_corrupt_image_fails_there(
    capsys, tmp_path, data
):
    code, _, err = main(capsys, *overrides(data, "strategy='nope'"))
    assert code == 2  # config errors come before the data is read
    folder = Path(data[1])
    assert not (folder / CACHE_DIRNAME).exists()
    bad = folder / "train" / "class01" / "1.png"
    bad.write_bytes(b"not an image")
    code, out, err = main(capsys, *overrides(data, ""))
    assert code == 2 and out.count("\n") == 0, out
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "1.png" in err and "Traceback" not in err


def test_bad_clients_setting_and_federation(capsys, tmp_path, data):
    code, _, err = main(capsys, "--clients", "many", *overrides(data, ""))
    assert code == 2 and "CLIENTS=many is not allowed" in err
    code, _, err = main(capsys, "--clients", "0", *overrides(data, ""))
    assert code == 2 and "CLIENTS=0 is not allowed" in err
    code, _, err = main(capsys, "--setting", "conf/none.toml", *overrides(data, ""))
    assert code == 2 and "SETTING=conf/none.toml: no such file" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("strategy = local\n")  # unquoted string
    code, _, err = main(capsys, "--setting", str(bad), *overrides(data, ""))
    assert code == 2 and "not valid TOML" in err and err.count("\n") == 1
    bad.write_text('foo = "x"\n')
    code, _, err = main(capsys, "--setting", str(bad), *overrides(data, ""))
    assert code == 2 and f"SETTING={bad}: unknown run-config key 'foo'" in err


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpg.tar.gz").is_file(), reason="no CIFAR-10 copy"
)
def test_paper_setting_with_50_clients(tmp_path):
    args = launcher.parse_args(
        [
            "--setting",
            str(APP / "conf" / "cifar10-pathological-cnn.toml"),
            "--clients",
            "50",
            "--data-dir",
            str(SHARED_DATA),
            "--results-dir",
            str(tmp_path / "results"),
            "--run-config",
            'num-server-rounds=3 hn-update="mean"',
        ]
    )
    launch = launcher.prepare(args)
    assert launch.num_supernodes == 50 and launch.rounds == 3
    assert launch.resources == {
        "client-resources-num-cpus": 1,
        "client-resources-num-gpus": 0.0,
    }
    assert launch.overrides == {
        "dataset": "cifar10",
        "models": "cnn",
        "partition": "pathological",
        "classes-per-client": 2,
        "num-server-rounds": 3,  # RUN_CONFIG over the setting file
        "hn-update": "mean",
        "data-dir": str(SHARED_DATA),
        "results-dir": str(tmp_path / "results"),
    }


def test_relative_paths_are_from_the_callers_directory(tmp_path, monkeypatch):
    image_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    launch = launcher.prepare(
        launcher.parse_args(
            [
                "--data-dir",
                "data",
                "--results-dir",
                "out",
                "--clients",
                "3",
                "--run-config",
                "dataset='imagefolder' num-server-rounds=1",
            ]
        )
    )
    assert launch.overrides["data-dir"] == str(tmp_path / "data")
    assert launch.overrides["results-dir"] == str(tmp_path / "out")
    assert launch.results_dir == tmp_path / "out" and launch.results_dir.is_dir()
    assert launch.num_supernodes == 3


def test_run_config_is_read_like_flwr_reads_it():
    parsed = launcher.parse_overrides(
        "a=1 b='x y' c=\"z\" d=true e=0.5 f.g=2 models='cnn,vgg8'"
    )
    assert parsed == {
        "a": 1,
        "b": "x y",
        "c": "z",
        "d": True,
        "e": 0.5,
        "f.g": 2,
        "models": "cnn,vgg8",
    }
    assert launcher.parse_overrides("  ") == {}


def test_outcome_reads_the_results_folder_and_the_log(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    log = f"INFO :      Results directory: {folder}\nINFO :      round 1/2 | ...\n"
    finished, line, found = launcher.outcome(0, log, 2)
    assert not finished and found == folder
    assert line.startswith("failed without a summary")
    (folder / "summary.json").write_text(json.dumps({"rounds": 1}))
    crash = log + "ValueError: boom\nERROR :     Exit Code: 700\n"
    finished, line, _ = launcher.outcome(0, crash, 2)
    assert not finished and line == "failed after 1/2 rounds: ValueError: boom"
    (folder / "summary.json").write_text(
        json.dumps({"rounds": 2, "final_accuracy": 0.5, "best_accuracy": 0.6})
    )
    finished, line, _ = launcher.outcome(0, log, 2)
    assert finished and line.startswith("finished: 2 rounds, final accuracy 0.5000")
    finished, line, found = launcher.outcome(0, "no results line\n", 2)
    assert not finished and found is None
    assert line.startswith("failed before round 1 (no results folder)")


# ----------------------------------------------------------------- end to end


def _flower_processes(tmp_path: Path) -> list[int]:
    """PIDs started by a launch of this test: they inherit its marker variable."""
    mark = f"MHPFEDHN_RUN_TEST={tmp_path}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in env:
            pids.append(int(entry.name))
    return pids


def _launch(tmp_path: Path, *args: str, **popen) -> subprocess.Popen:
    env = os.environ | {
        "MHPFEDHN_RUN_TEST": str(tmp_path),
        "FLWR_HOME": str(tmp_path / "unused-flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tools.run", *args],
        cwd=APP,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _nothing_left(tmp_path: Path) -> None:
    deadline = time.monotonic() + 10
    while _flower_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _flower_processes(tmp_path) == []
    # The launcher's own SuperLink was used, never one under FLWR_HOME.
    assert not (tmp_path / "unused-flwr-home").exists()


@pytest.mark.e2e
def test_make_run_one_round_two_clients(tmp_path, cifar10_dir):
    proc = _launch(
        tmp_path,
        "--clients",
        "2",
        "--data-dir",
        str(cifar10_dir),
        "--results-dir",
        str(tmp_path / "results"),
        "--run-config",
        "num-server-rounds=1 models='cnn' run-name='one'",
    )
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    run = tmp_path / "results" / "one"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 1
    assert (run / "flwr-run.log").is_file() and (run / "metrics.jsonl").is_file()
    assert f"finished: 1 round, final accuracy {summary['final_accuracy']:.4f}" in out
    _nothing_left(tmp_path)


@pytest.mark.e2e
def test_a_failing_serverapp_exits_non_zero(tmp_path):
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"not a checkpoint")
    proc = _launch(
        tmp_path,
        "--clients",
        "2",
        "--data-dir",
        str(image_folder(tmp_path / "data")),
        "--results-dir",
        str(tmp_path / "results"),
        "--run-config",
        f"dataset='imagefolder' hypernet-from='{garbage}'",
    )
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 1, out[-4000:]
    # The launcher only checks that the file exists; the ServerApp fails reading it.
    assert "failed without a summary" in out or "failed after 0/" in out, out[-4000:]
    assert f"hypernet-from {garbage} cannot be read (UnpicklingError)" in out
    assert "weights_only" not in out.split("failed", 1)[-1]
    _nothing_left(tmp_path)


@pytest.mark.e2e
def test_ctrl_c_stops_the_run_and_its_superlink(tmp_path, cifar10_dir):
    proc = _launch(
        tmp_path,
        "--clients",
        "2",
        "--data-dir",
        str(cifar10_dir),
        "--results-dir",
        str(tmp_path / "results"),
        "--run-config",
        "num-server-rounds=50",
        start_new_session=True,  # like a terminal: SIGINT to the whole group
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Results directory:" in line:
            break
    assert _flower_processes(tmp_path), "".join(seen)[-4000:]
    os.killpg(proc.pid, signal.SIGINT)
    # Stopping Ray and the SuperLink takes up to ~45 s of grace; more when loaded.
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(seen)[-2000:] + out[-2000:]
    assert "interrupted" in out
    _nothing_left(tmp_path)
