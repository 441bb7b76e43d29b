"""Progress of a study across workers: counts, the front so far, bad targets."""

from pathlib import Path

import optuna
import pytest

from experiments.status import front_so_far, load_study, main, progress
from strategies import OptunaStrategy
from tests.strategies.toy import ToyEvaluator, toy_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _StopAt(ToyEvaluator):
    """Raises KeyboardInterrupt (Ctrl-C) at its third evaluation."""

    def evaluate(self, scheme):
        if self.calls == 2:
            self.calls += 1
            raise KeyboardInterrupt
        return super().evaluate(scheme)


def test_status_of_a_run_counts_trials_and_shows_the_front(tmp_path: Path, capsys) -> None:
    space = toy_space()
    with pytest.raises(KeyboardInterrupt):
        OptunaStrategy(n_trials=12).search(space, _StopAt(space), run_dir=tmp_path)
    study = load_study(f"sqlite:///{tmp_path / 'optuna.db'}")
    counts = progress(study)
    assert (counts.finished, counts.interrupted, counts.re_enqueued, counts.lost, counts.running) == (2, 1, 1, 0, 0)
    assert counts.waiting == len(space.uniform_schemes()) - 2  # the rest of the warm start and the retry

    result = OptunaStrategy(n_trials=12).search(space, ToyEvaluator(space), run_dir=tmp_path)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "launched: 13  finished: 12  failed: 0  interrupted: 1  re-enqueued: 1  lost: 0" in out
    assert "accuracy maximize, latency_ms minimize" in out
    front = front_so_far(study)
    expected = result.front.drop_duplicates("scheme")
    assert sorted(front["accuracy"]) == sorted(expected["accuracy"]) and len(front) == len(expected)
    assert study.metric_names == [o.name for o in result.objectives]  # optuna-dashboard shows these names
    for summary in front["summary"]:
        assert summary in out


def test_status_reads_a_journal_and_picks_a_study(tmp_path: Path, capsys) -> None:
    space = toy_space()
    journal = f"journal:{tmp_path / 'x.journal'}"
    for name in ("a", "b"):
        OptunaStrategy(n_trials=3, storage=journal, study_name=name, warm_start=False).search(
            space, ToyEvaluator(space)
        )
    assert main([journal]) == 2
    assert capsys.readouterr().err == f"nmsearch: {journal} holds 2 studies (a, b); pick one with --study NAME\n"
    assert main([str(tmp_path / "x.journal"), "--study", "b"]) == 0
    assert "study 'b'" in capsys.readouterr().out
    assert main([journal, "--study", "c"]) == 2
    assert capsys.readouterr().err == f"nmsearch: no study 'c' in {journal}; it holds: a, b\n"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{tmp}/nothing", "is neither a run directory with an Optuna study nor a storage"),
        ("sqlite:///{tmp}/none.db", "no SQLite file at"),
        ("{tmp}/none.journal", "no Journal file at"),
    ],
)
def test_bad_targets_are_one_line(tmp_path: Path, capsys, target: str, message: str) -> None:
    assert main([target.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("nmsearch: ")
    assert not any(tmp_path.iterdir())  # nothing created
