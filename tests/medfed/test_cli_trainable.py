"""`medfed simulate` refuses settings that cannot train before any site starts (exit 2)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import EXIT_BAD_INPUT, app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--max-grad-norm", "inf"], "--max-grad-norm must be a finite number, got inf"),
        (["--clip-norm", "inf"], "--clip-norm must be a finite number, got inf"),
        (["--target-epsilon", "nan"], "--target-epsilon must be a finite number, got nan"),
        (["--target-epsilon", "1e-6"], "The smallest that works at --delta 1e-05 "
                                       "(--accountant rdp) is 0.103"),
    ],
)
def test_settings_that_cannot_train_exit_2(small_hospitals: Path, tmp_path: Path, args,
                                            message) -> None:
    result = runner.invoke(
        app, ["simulate", "--data", str(small_hospitals / "sites"), "--out",
              str(tmp_path / "r"), "--metrics-port", "0", *args],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()  # refused before anything was written
