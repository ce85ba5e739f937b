"""Every code example in the README runs: the Python ones as written, the `notmnist` commands as the parser reads them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from demo.synthetic import write_letter_folders
from flows.cli import build_parser
from storage.layout import DataRoot
from tasks.decode import decode_to_shards

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)
# Placeholders the README asks the reader to fill in, and a value of the right kind for each.
PLACEHOLDERS = {"LARGE_BYTES": "9000000", "SMALL_BYTES": "1600000"}


def notmnist_commands() -> list[str]:
    """Each `notmnist ...` line of the shell examples, continuation lines joined, comments dropped."""
    commands = []
    for language, body in BLOCKS:
        if language == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith("notmnist "):
                    commands.append(line)
    return commands


@pytest.mark.parametrize("command", notmnist_commands())
def test_every_shell_example_is_a_valid_command(command):
    words = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    args = build_parser().parse_args(words)  # exits 2 on an option that does not exist
    assert args.handler is not None


def test_there_are_examples_of_every_stage_command():
    used = {command.split()[1] for command in notmnist_commands()}
    assert {"fetch", "extract", "shards", "splits", "train", "run", "mnist", "iris", "make-archives"} <= used


@pytest.mark.parametrize("code", [body for language, body in BLOCKS if language == "python"])
def test_every_python_example_runs_on_a_data_root_as_the_stages_leave_it(code, tmp_path, monkeypatch):
    folders = write_letter_folders(tmp_path / "extracted" / "notMNIST_large", per_letter=3, seed=1, bad_files={})
    decode_to_shards(folders.root, DataRoot(tmp_path / "data").shards("notMNIST_large"), workers=1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["image"].shape == (28, 28)


def test_the_deploy_steps_create_every_work_pool_that_prefect_yaml_names_before_deploying():
    """`prefect deploy --all` stops at the first deployment whose pool does not exist."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    pools = {deployment["work_pool"]["name"] for deployment in config["deployments"]}
    before_deploy = README[: README.index("prefect deploy --all")]
    created = set(re.findall(r"^prefect work-pool create (\S+)", before_deploy, flags=re.MULTILINE))
    assert pools and pools <= created, pools - created
