import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from strategies import DominoStrategy, GumbelStrategy, OptunaStrategy, RandomStrategy, UniformStrategy
from strategies.base import StrategyConfigError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from strategies.domino import BudgetMetric
from strategies.gumbel import LossForm
from strategies.optuna_strategy import Sampler

_EXECUTED: list[str] = []


def _payload(marker: str) -> None:
    _EXECUTED.append(marker)


class _Exploit:
    def __reduce__(self):
        return (_payload, ("ran",))


def test_saved_random_states_replay_the_same_draws_after_a_checkpoint(tmp_path: Path) -> None:
    def draws() -> tuple:
        cuda = torch.rand(3, device="cuda").tolist() if torch.cuda.is_available() else None
        return random.random(), float(np.random.rand()), torch.rand(3).tolist(), cuda

    draws()
    path = save_checkpoint(tmp_path / "run.pt", {"rng": rng_state()})
    expected = draws()
    draws()
    set_rng_state(load_checkpoint(path)["rng"])
    assert draws() == expected
    torch.manual_seed(0)
    legacy = torch.get_rng_state()  # Gumbel checkpoints once held the CPU state alone
    first = torch.rand(2)
    set_rng_state(legacy)
    assert torch.equal(torch.rand(2), first)


def test_checkpoint_round_trip_holds_tensors_and_plain_types(tmp_path: Path) -> None:
    state = {
        "epoch": 2,
        "model": {"w": torch.arange(4.0)},
        "rows": [{"loss": 0.5, "name": "a"}],
        "rng": torch.get_rng_state(),
    }
    path = save_checkpoint(tmp_path / "run.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and loaded["rows"] == state["rows"]
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_truncated_checkpoint_is_one_warning_and_a_fresh_start(tmp_path: Path, caplog) -> None:
    path = save_checkpoint(tmp_path / "run.pt", {"model": {"w": torch.randn(64, 64)}, "epoch": 3})
    path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="strategies.base"):
        assert load_checkpoint(path) is None
    assert len(caplog.records) == 1 and "cannot be read" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()


def test_crafted_pickle_payload_is_not_executed(tmp_path: Path, caplog) -> None:
    path = tmp_path / "run.pt"
    with path.open("wb") as handle:
        pickle.dump({"epoch": _Exploit()}, handle)
    torch.save({"epoch": _Exploit()}, tmp_path / "zip.pt")
    with caplog.at_level(logging.WARNING, logger="strategies.base"):
        assert load_checkpoint(path) is None
        assert load_checkpoint(tmp_path / "zip.pt") is None
    assert _EXECUTED == []
    assert len(caplog.records) == 2


def test_strategy_fields_are_checked_when_made() -> None:
    with pytest.raises(StrategyConfigError, match=r"^optuna\.n_trials must be an integer, got 2\.5$"):
        OptunaStrategy(n_trials=2.5)
    with pytest.raises(StrategyConfigError, match=r"^unknown sampler 'bogus'; choose one of tpe, nsga2"):
        OptunaStrategy(sampler="bogus")
    with pytest.raises(StrategyConfigError, match=r"gumbel\.loss = 'l2' is not one of additive, fbnet, budget"):
        GumbelStrategy(loss="l2")
    with pytest.raises(StrategyConfigError, match=r"domino\.target_value must be a number"):
        DominoStrategy(target_value="half")
    with pytest.raises(StrategyConfigError, match=r"gumbel\.lambdas\[1\] must be a number"):
        GumbelStrategy(lambdas=[1.0, "x"])
    strategy = DominoStrategy(target="macs", target_value=1)
    assert strategy.target == "macs" and strategy.target is BudgetMetric.macs and f"{strategy.target}" == "macs"
    assert isinstance(strategy.target_value, float) and OptunaStrategy(sampler="random").sampler == "random"
    assert json.loads(json.dumps({"s": Sampler.tpe})) == {"s": "tpe"}


def test_hydra_checks_choice_fields_when_composing() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from experiments.config import register_configs

    register_configs()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(conf, version_base="1.3"):
        cfg = compose("config", overrides=["strategy=gumbel", "strategy.loss=fbnet"])
        with pytest.raises(ConfigCompositionException, match="l2"):
            compose("config", overrides=["strategy=gumbel", "strategy.loss=l2"])
    assert OmegaConf.to_object(cfg.strategy).loss is LossForm.fbnet


@pytest.mark.parametrize(
    "make",
    [
        lambda: OptunaStrategy(n_trials=3),
        lambda: UniformStrategy(),
        lambda: RandomStrategy(n_trials=3),
        lambda: GumbelStrategy(lambdas=[1.0]),
        lambda: DominoStrategy(m=8),
    ],
)
def test_every_strategy_state_round_trips_through_a_checkpoint(make, tmp_path: Path) -> None:
    strategy = make()
    strategy._record_progress(step=3, weights={"w": torch.arange(4.0)}, log=[{"layer": "a", "n": 7}])
    state = load_checkpoint(save_checkpoint(tmp_path / "state.pt", strategy.state_dict()))
    assert state is not None and state["strategy"] == strategy.name and state["config"] == strategy.config_key()
    again = make()
    again.load_state_dict(state)
    assert again.state_dict()["progress"]["log"] == [{"layer": "a", "n": 7}]
    assert torch.equal(again.state_dict()["progress"]["weights"]["w"], torch.arange(4.0))


def test_recorded_progress_is_a_copy_training_does_not_move() -> None:
    strategy, weight = DominoStrategy(m=8), torch.zeros(2)
    strategy._record_progress(weight=weight)
    weight.add_(1)
    assert torch.equal(strategy.state_dict()["progress"]["weight"], torch.zeros(2))


def test_a_state_of_another_strategy_or_configuration_is_refused() -> None:
    state = DominoStrategy(m=8).state_dict()
    with pytest.raises(StrategyConfigError, match="of strategy 'domino'"):
        GumbelStrategy().load_state_dict(state)
    with pytest.raises(StrategyConfigError, match="another configuration"):
        DominoStrategy(m=4).load_state_dict(state)
    with pytest.raises(StrategyConfigError, match="not a strategy state"):
        DominoStrategy(m=8).load_state_dict({"epoch": 3})


def test_a_checkpoint_of_another_configuration_is_one_warning_and_a_fresh_start(tmp_path: Path, caplog) -> None:
    path = save_checkpoint(tmp_path / "state.pt", DominoStrategy(m=8, seed=1).state_dict())
    with caplog.at_level(logging.WARNING):
        assert DominoStrategy(m=8)._resume_from(path) is None
    assert len(caplog.records) == 1 and "another configuration" in caplog.records[0].getMessage()
    assert DominoStrategy(m=8, seed=1)._resume_from(path) == {}
