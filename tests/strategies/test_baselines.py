from pathlib import Path

import optuna
import pytest

from search_space import SearchSpace
from strategies import RandomStrategy, UniformStrategy
from strategies.base import load_checkpoint, save_checkpoint
from tests.strategies.toy import ToyEvaluator, toy_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def space() -> SearchSpace:
    return toy_space()


@pytest.mark.parametrize("make", [lambda: UniformStrategy(), lambda: RandomStrategy(n_trials=5, seed=0)])
def test_a_baseline_state_round_trips_and_resumes_what_it_evaluated(make, space: SearchSpace, tmp_path: Path) -> None:
    first = make()
    before = first.search(space, ToyEvaluator(space), run_dir=tmp_path)
    state = load_checkpoint(save_checkpoint(tmp_path / "state.pt", first.state_dict()))
    assert state is not None and state["strategy"] == first.name
    assert state["progress"]["finished"] == len(before.trials) > 0  # what it has evaluated
    again, evaluator = make(), ToyEvaluator(space)
    again.load_state_dict(state)
    after = again.search(space, evaluator, run_dir=tmp_path)
    assert evaluator.calls == 0 and after.trials["scheme"].tolist() == before.trials["scheme"].tolist()
    assert again.state_dict() == state
