"""How the search space is explored (strategies import search_space, never the reverse)."""

from strategies.base import Candidate, ResultFileError, SearchResult, Strategy, accuracy_part, trials_frame
from strategies.baselines import RandomStrategy, UniformStrategy
from strategies.domino import DominoStrategy
from strategies.gumbel import GumbelStrategy
from strategies.optuna_strategy import SAMPLERS, OptunaStrategy, make_sampler
from strategies.sensitivity import allocation_schemes, layer_sensitivity, plot_sensitivity
from strategies.storage import StorageError, open_storage

__all__ = [
    "SAMPLERS",
    "Candidate",
    "DominoStrategy",
    "GumbelStrategy",
    "OptunaStrategy",
    "RandomStrategy",
    "ResultFileError",
    "SearchResult",
    "StorageError",
    "Strategy",
    "UniformStrategy",
    "accuracy_part",
    "allocation_schemes",
    "layer_sensitivity",
    "make_sampler",
    "open_storage",
    "plot_sensitivity",
    "trials_frame",
]
