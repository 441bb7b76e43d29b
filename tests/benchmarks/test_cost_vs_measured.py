"""benchmarks/cost_vs_measured.py: refitting an earlier run's measurements, and its bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.cost_vs_measured import read_measured, with_speedups


def measured_csv(tmp_path: Path, rows: list[tuple]) -> Path:
    path = tmp_path / "measured.csv"
    pd.DataFrame(rows, columns=["layer", "batch", "option", "measured_ms", "spread"]).to_csv(path, index=False)
    return path


def test_read_measured_rebuilds_rows_and_speedups(tmp_path: Path) -> None:
    path = measured_csv(
        tmp_path,
        [
            ("conv 256ch 8x8", 1, "dense", 1.0, 1.02),
            ("conv 256ch 8x8", 1, "r0.2", 0.5, 1.01),
            ("linear 1024->1024", 1, "dense", 0.1, 1.0),
            ("linear 1024->1024", 1, "a2:4", 0.2, 1.1),
        ],
    )
    rows = read_measured(path)
    assert [row["option"] for row in rows] == ["dense", "r0.2", "dense", "a2:4"]
    assert [row["measured_speedup"] for row in rows] == pytest.approx([1.0, 2.0, 1.0, 0.5])
    assert rows[1]["kind"] == "conv" and "r0.2" in rows[1]["space"].option_names("0")
    # What the fit weighs: every latency, then each non-dense row's speedup over its own layer's dense row.
    assert with_speedups(rows, np.array([1.0, 0.5, 0.1, 0.2])) == pytest.approx([1.0, 0.5, 0.1, 0.2, 2.0, 0.5])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([("conv 9ch", 1, "dense", 1.0, 1.0)], "unknown layer 'conv 9ch'"),
        ([("conv 256ch 8x8", 1, "r0.2", 1.0, 1.0)], "has no dense row"),
        ([("conv 256ch 8x8", 1, "dense", 0.0, 1.0)], "must be a positive number"),
        ([("linear 1024->1024", 1, "dense", 1.0, 1.0), ("linear 1024->1024", 1, "r0.2", 1.0, 1.0)], "not one of"),
    ],
)
def test_read_measured_refuses_bad_files_in_one_line(tmp_path: Path, rows: list[tuple], message: str) -> None:
    with pytest.raises(SystemExit, match=message) as error:
        read_measured(measured_csv(tmp_path, rows))
    assert "\n" not in str(error.value)


def test_read_measured_refuses_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("layer,batch\nconv 256ch 8x8,1\n")
    with pytest.raises(SystemExit, match="missing column 'option'"):
        read_measured(path)
    with pytest.raises(SystemExit, match="cannot read it"):
        read_measured(tmp_path / "absent.csv")
