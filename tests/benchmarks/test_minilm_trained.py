"""benchmarks/minilm_trained.py (Gumbel and DominoSearch on the MiniLM benchmark's evaluator) and its
aggregation by benchmarks/minilm_quality.py, on a tiny label-free encoder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from search_space import NMSearchError
from tests.benchmarks import benchmark_modules
from tests.strategies.toy import TinyEncoderTask


@pytest.fixture(scope="module")
def modules():
    return benchmark_modules("minilm_trained", "minilm_quality")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["epochs"], r"^--set takes FIELD=VALUE, got 'epochs'$"),
        (["bogus=1"], r"^--set bogus: not a field of gumbel this benchmark lets you set \("),
        (["seed=3"], r"^--set seed: not a field of gumbel"),  # --seed sets it
        (["epochs=many"], r"epochs"),
    ],
)
def test_bad_overrides_are_one_line(modules, overrides: list[str], message: str) -> None:
    minilm_trained, _ = modules
    with pytest.raises(NMSearchError, match=message) as error:
        minilm_trained.make_strategy("gumbel", 0, overrides)
    assert "\n" not in str(error.value)


def test_the_command_line_refuses_bad_input_in_one_line(modules, tmp_path: Path, capsys) -> None:
    minilm_trained, minilm_quality = modules
    out, a_file = tmp_path / "out", tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in [
        (["gumbel", "--out", str(out), "--set", "bogus=1"], "--set bogus: not a field of gumbel"),
        (["domino", "--out", str(out), "--cost-batch", "0"], "--cost-batch must be >= 1, got 0"),
        (["optuna", "--out", str(out)], "invalid choice: 'optuna'"),
        (["domino", "--out", str(a_file / "run")], f"--out '{a_file / 'run'}' cannot be created"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            minilm_trained.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        minilm_quality.main([str(tmp_path)])
    assert "no minilm_front.csv or minilm_front_<strategy>.csv in" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["a_file"]  # nothing written


def test_gumbel_and_domino_rows_aggregate_with_the_other_strategies(modules, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    minilm_trained, minilm_quality = modules
    bench = minilm_trained.setup(TinyEncoderTask(train_batches=5, batch=4), ["2:4"], "a100", 256)
    gumbel = minilm_trained.make_strategy(
        "gumbel", 0, ["epochs=1", "warmup_fraction=0", "lambdas=[3]", "cost_metric=bytes_mb"]
    )
    domino = minilm_trained.make_strategy(
        "domino", 0, ["m=4", "target=params", "target_value=0.5", "max_epochs=1", "vote_interval=1"]
    )
    run = tmp_path / "seed0"
    for strategy in (gumbel, domino):
        frame = minilm_trained.run(bench, strategy, run)
        points = frame[frame["kind"] == strategy.name]
        assert len(points) >= 1 and points["cosine"].between(-1, 1).all() and (points["search_s"] > 0).all()
        assert set(frame.loc[frame["kind"] == "uniform", "label"]) == {"dense", "weights 2:4"}
    assert len(frame[frame["kind"] == "domino"]) >= 2  # every commit: a front, not one point
    assert (run / "minilm_gumbel_log.csv").is_file() and (run / "minilm_domino_log.csv").is_file()
    # minilm.py's optuna front in the same run directory; its uniform rows are the same schemes
    uniform = frame[frame["kind"] == "uniform"]
    optuna = pd.concat([uniform, uniform.iloc[:1].assign(kind="optuna", label="trial 0")])
    optuna.to_csv(run / "minilm_front.csv", index=False)
    csv = tmp_path / "quality.csv"
    minilm_quality.main([str(run), "--reference", "-1.0", "1e6", "--csv", str(csv)])
    table = pd.read_csv(csv)
    assert table["strategy"].tolist() == ["optuna", "uniform", "domino", "gumbel", "optuna own"]
    assert table.loc[table["strategy"] == "uniform", "points"].item() == 2  # not once per file
    columns = ["run", "strategy", "points", "hypervolume", "budgets beating uniform"]
    assert list(table.columns[: len(columns)]) == columns
    assert (table.set_index("strategy").loc[["gumbel", "domino", "uniform"], "hypervolume"] > 0).all()
    assert table.loc[table["strategy"] == "optuna own", "points"].item() == 0  # its one trial is a uniform scheme
    assert table.loc[table["strategy"] == "gumbel", "search_s"].item() > 0
