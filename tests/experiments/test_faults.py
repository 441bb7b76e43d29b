"""Faults and bad input across the CLI and the Python API: one clear line, never a traceback,
never a silently wrong answer (issue 17). CLI cases assert a non-zero exit, exactly one line on
stderr and no 'Traceback'; API cases assert the error type and the words that tell the fix.

One small finished search is shared by the whole module; the search CLI cases run in one
subprocess (tests/experiments/cli_driver.py) so the imports are paid once.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from optuna.exceptions import StorageInternalError
from torch import nn

from evaluators import (
    CompositeEvaluator,
    CostEvaluator,
    Evaluation,
    EvaluatorError,
    HardwareCostModel,
    Objective,
    Trainer,
    check_evaluator,
    evaluate_safely,
)
from evaluators.task import TaskError
from experiments.compare import main as compare_main
from experiments.errors import INTERRUPTED, USAGE, error_line, run_cli
from experiments.export import main as export_main
from experiments.report import plot_result, summary
from experiments.runs import RUN_RECORD, RunDirError, claim_run_dir, defining_config, find_runs
from experiments.search import run
from experiments.tasks import get_task
from search_space import NMSearchError, OutputDirError, Scheme, SchemeError, SearchSpace, check_writable_dir
from strategies import (
    Candidate,
    DominoStrategy,
    GumbelStrategy,
    OptunaStrategy,
    ResultFileError,
    SearchResult,
    UniformStrategy,
)
from tests.strategies.toy import ToyEvaluator, toy_model, toy_space

ROOT = Path(__file__).resolve().parents[2]
FAST = ["task=synthetic", "strategy.n_trials=10"]


# -- shared fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def config(cache: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"cache_dir={cache}"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache: Path) -> Path:
    """One finished 10-trial Optuna run on the synthetic task (read-only for the tests)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(config(cache, *FAST), out)
    return out


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, for tests that damage it."""
    target = tmp_path / "copy"
    shutil.copytree(finished, target)
    return target


def readonly_folder(base: Path) -> Path:
    """A folder nothing can be written to (chmod, or /sys when running as root)."""
    folder = base / "readonly"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    folder.chmod(0o755)
    try:
        check_writable_dir("/sys/nmsearch-probe", "probe", "")
    except OutputDirError:
        return Path("/sys/nmsearch-readonly")
    pytest.skip("no read-only folder here (root without a read-only mount)")


def one_line(capsys, code: int, *expected: str) -> str:
    """The CLI reported exactly one line on stderr, with a non-zero exit and each expected part."""
    err = capsys.readouterr().err
    assert code != 0, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for part in expected:
        assert part in err, err
    return err


# -- the search CLI (one subprocess for all cases) ---------------------------------------------
Case = namedtuple("Case", "args expected")


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, finished: Path, cache: Path) -> dict:
    tmp = tmp_path_factory.mktemp("cli")
    for name in ("hw", "ev", "st", "legacy"):
        shutil.copytree(finished, tmp / name)
    (tmp / "legacy" / RUN_RECORD).unlink()
    (tmp / "legacy" / "result.json").unlink()  # an interrupted search of an older version
    (tmp / "afile").write_text("x")
    readonly = readonly_folder(tmp)
    c = f"cache_dir={cache}"
    cases = {
        "other_hardware": Case([*FAST, c, "hardware=a100", f"hydra.run.dir={tmp / 'hw'}"], ["hardware.name"]),
        "other_evaluator": Case(
            [*FAST, c, "evaluator=finetune", f"hydra.run.dir={tmp / 'ev'}"], ["evaluator.fidelity", "force_new=true"]
        ),
        "other_strategy": Case(
            ["task=synthetic", c, "strategy=uniform", f"hydra.run.dir={tmp / 'st'}"], ["strategy.name"]
        ),
        "unknown_unfinished": Case([*FAST, c, f"hydra.run.dir={tmp / 'legacy'}"], ["without a run.json"]),
        "select_syntax": Case(
            [*FAST, c, "select.constraints=['latency_ms<0.1']", f"hydra.run.dir={tmp / 's1'}"],
            ["invalid constraint", "metric<=value"],
        ),
        "select_metric": Case(
            [*FAST, c, "select.constraints=['flops<=1']", f"hydra.run.dir={tmp / 's2'}"], ["'flops'", "latency_ms"]
        ),
        "select_objective": Case(
            [*FAST, c, "select.objective=energy_mj", f"hydra.run.dir={tmp / 's3'}"], ["not optimised"]
        ),
        "device_bogus": Case([*FAST, c, "device=tpu9", f"hydra.run.dir={tmp / 'd1'}"], ["not a torch device"]),
        "cache_unwritable": Case(
            [*FAST, f"cache_dir={readonly / 'cache'}", f"hydra.run.dir={tmp / 'c1'}"],
            ["pre-training cache", "not writable"],
        ),
        "cache_is_file": Case(
            [*FAST, f"cache_dir={tmp / 'afile'}", f"hydra.run.dir={tmp / 'c2'}"], ["pre-training cache", "is a file"]
        ),
        "run_dir_readonly": Case([*FAST, c, f"hydra.run.dir={readonly / 'run'}"], ["hydra.run.dir"]),
        "run_dir_is_file": Case([*FAST, c, f"hydra.run.dir={tmp / 'afile'}"], ["hydra.run.dir"]),
        "include_typo": Case(
            [*FAST, c, "space.include=[feature.0]", f"hydra.run.dir={tmp / 'i1'}"],
            ["'feature.0' matches no layer", "did you mean 'features.0'"],
        ),
        "exclude_typo": Case(
            [*FAST, c, "space.exclude=[clasifier]", f"hydra.run.dir={tmp / 'i2'}"],
            ["'clasifier' matches no layer", "'classifier'"],
        ),
        "objective_unknown": Case(
            ["task=synthetic", c, "objectives=[accuracy,flops]", f"hydra.run.dir={tmp / 'o'}"],
            ["choose from latency_ms"],
        ),
        "key_typo": Case(["strategy.n_trial=5", f"hydra.run.dir={tmp / 'k'}"], ["n_trial"]),
        "bad_override_grammar": Case(
            ["select.constraints=[latency<0.1]", f"hydra.run.dir={tmp / 'g'}"], ["cannot parse the override", "quote"]
        ),
    }
    if not torch.cuda.is_available():
        cases["device_cuda"] = Case([*FAST, c, "device=cuda", f"hydra.run.dir={tmp / 'd2'}"],
                                    ["device='cuda'", "device=cpu"])  # fmt: skip
    (tmp / "cases.json").write_text(json.dumps({name: case.args for name, case in cases.items()}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, "-m", "tests.experiments.cli_driver", str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    return {name: (case, results[name], tmp) for name, case in cases.items()}


SEARCH_CASES = [
    "other_hardware", "other_evaluator", "other_strategy", "unknown_unfinished", "select_syntax", "select_metric",
    "select_objective", "device_bogus", "device_cuda", "cache_unwritable", "cache_is_file", "run_dir_readonly",
    "run_dir_is_file", "include_typo", "exclude_typo", "objective_unknown", "key_typo", "bad_override_grammar",
]  # fmt: skip


@pytest.mark.parametrize("name", SEARCH_CASES)
def test_search_cli_bad_input_is_one_line(cli_results: dict, name: str) -> None:
    if name not in cli_results:
        pytest.skip("CUDA is available here")
    case, result, _ = cli_results[name]
    err = result["stderr"]
    assert result["code"] not in (0, "exception"), err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith("nmsearch: "), err
    for part in case.expected:
        assert part in err, err


def test_refused_searches_did_no_work_and_kept_the_old_run(cli_results: dict, finished: Path) -> None:
    tmp = cli_results["other_hardware"][2]
    for name in ("s1", "s2", "s3", "i1", "d1"):
        assert not (tmp / name / "trials.csv").exists() and not (tmp / name / "optuna.db").exists()
    for name in ("hw", "ev", "st"):  # the refused resume left the earlier search untouched
        assert (tmp / name / "trials.csv").read_bytes() == (finished / "trials.csv").read_bytes()
        assert not list((tmp / name).glob("replaced-*"))


# -- run directories: what defines a run ---------------------------------------------------------
def _defining(cache: Path, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    return defining_config(OmegaConf.to_container(config(cache, *FAST, *overrides), resolve=True))


def test_run_record_is_written_and_resume_with_the_same_config_is_allowed(finished: Path, cache: Path) -> None:
    record = json.loads((finished / RUN_RECORD).read_text())["defining"]
    assert record == _defining(cache)
    assert claim_run_dir(finished, _defining(cache), write=False) == "resume"


@pytest.mark.parametrize("override", ["strategy.n_trials=60", "select.constraints=['accuracy>=0.5']",
                                      "strategy.timeout_s=30", "progress=true", "device=cpu"])  # fmt: skip
def test_operational_keys_do_not_block_a_resume(finished: Path, cache: Path, override: str) -> None:
    assert claim_run_dir(finished, _defining(cache, override), write=False) == "resume"


@pytest.mark.parametrize(
    ("override", "key"),
    [("hardware=a100", "hardware.name"), ("evaluator=finetune", "evaluator.fidelity"), ("seed=1", "seed"),
     ("objectives=[accuracy,energy_mj]", "objectives"), ("space=weights", "space.targets"),
     ("task.schedule.finetune_lr=0.5", "task.schedule.finetune_lr"), ("strategy.sampler=nsga2", "strategy.sampler")],
)  # fmt: skip
def test_defining_keys_refuse_a_resume_naming_them(finished: Path, cache: Path, override: str, key: str) -> None:
    with pytest.raises(RunDirError, match=rf"differs in [^:]*\b{key}\b"):
        claim_run_dir(finished, _defining(cache, override), write=False)


def test_force_new_moves_the_old_search_aside(copy: Path, cache: Path) -> None:
    before = (copy / "trials.csv").read_bytes()
    assert claim_run_dir(copy, _defining(cache, "hardware=a100"), force_new=True) == "replaced"
    (moved,) = copy.glob("replaced-*")
    assert (moved / "trials.csv").read_bytes() == before and not (copy / "trials.csv").exists()
    assert not (copy / "optuna.db").exists() and json.loads((copy / RUN_RECORD).read_text())["defining"][
        "hardware"
    ]["name"] == "A100-SXM-80GB"  # fmt: skip
    with pytest.raises(NMSearchError, match="holds no finished search"):
        find_runs([copy])  # the moved-aside search is not a run of this directory


def test_corrupt_run_record_is_refused(copy: Path, cache: Path) -> None:
    (copy / RUN_RECORD).write_bytes(b"\x00\xff garbage")
    with pytest.raises(RunDirError, match="is corrupt"):
        claim_run_dir(copy, _defining(cache), write=False)


def test_result_of_another_strategy_is_never_overwritten(copy: Path) -> None:
    result = SearchResult.load(copy)
    other = SearchResult("uniform", result.objectives, result.trials, result.schemes)
    with pytest.raises(ResultFileError, match="holds results of strategy 'optuna'"):
        other.save(copy)


# -- export: which point, and refusals ---------------------------------------------------------
def test_min_accuracy_selects_the_cheapest_point_that_meets_it(finished: Path, tmp_path: Path) -> None:
    front = SearchResult.load(finished).front
    floor = float(front["accuracy"].min())
    assert export_main([str(finished), "--min-accuracy", str(floor), "--out", str(tmp_path / "a.json")]) == 0
    picked = json.loads((tmp_path / "a.json").read_text())
    meeting = front[front["accuracy"] >= floor]
    cheapest = meeting.sort_values(["latency_ms", "accuracy", "bytes_mb"], ascending=[True, False, True]).iloc[0]
    assert picked["provenance"]["trial"] == cheapest["trial"]  # the cheapest, not the most accurate
    assert picked["metrics"]["latency_ms"] == front["latency_ms"].min()
    assert export_main([str(finished), "--constraint", f"accuracy>={floor}", "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] == picked["metrics"]


def test_objective_overrides_the_default_choice(finished: Path, tmp_path: Path) -> None:
    front = SearchResult.load(finished).front
    floor = float(front["accuracy"].min())
    args = [str(finished), "--min-accuracy", str(floor), "--objective", "accuracy", "--out", str(tmp_path / "a.json")]
    assert export_main(args) == 0
    assert json.loads((tmp_path / "a.json").read_text())["metrics"]["accuracy"] == front["accuracy"].max()


def test_cost_bound_selects_the_most_accurate_point_within(finished: Path, tmp_path: Path) -> None:
    front = SearchResult.load(finished).front
    bound = float(front["latency_ms"].max())
    assert export_main([str(finished), "--max-latency", str(bound), "--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["metrics"]["accuracy"] == front["accuracy"].max()


def _cut_at_line(path: Path, keep: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:keep]))


DAMAGE = {
    "trials_cut_at_line": (lambda d: _cut_at_line(d / "trials.csv", 4), "has 3 rows, result.json recorded 10"),
    "trials_cut_mid_line": (
        lambda d: (d / "trials.csv").write_bytes((d / "trials.csv").read_bytes()[:-40]),
        "ends in the middle of a line",
    ),
    "trials_empty": (lambda d: (d / "trials.csv").write_bytes(b""), "cannot be read as CSV"),
    "trials_binary": (lambda d: (d / "trials.csv").write_bytes(os.urandom(300) + b"\n"), "trials.csv"),
    "trials_header_only": (lambda d: _cut_at_line(d / "trials.csv", 1), "has 0 rows"),
    "trials_other_columns": (lambda d: (d / "trials.csv").write_text("a,b\n1,2\n"), "lacks the column 'trial'"),
    "result_truncated": (
        lambda d: (d / "result.json").write_text((d / "result.json").read_text()[:50]),
        "is not valid JSON",
    ),
    "result_binary": (lambda d: (d / "result.json").write_bytes(b"\x89PNG\x00\xff"), "is not valid JSON"),
    "result_not_a_result": (lambda d: (d / "result.json").write_text("[1, 2]"), "is not an nmsearch result"),
    "scheme_file_garbage": (
        lambda d: next((d / "schemes").glob("*.json")).write_bytes(b"\xff\xfe\x00"),
        "binary data",
    ),
    "config_yaml_broken": (lambda d: (d / "config.yaml").write_text("a: [unclosed\n"), "is not valid YAML"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_export_refuses_damaged_result_files(copy: Path, tmp_path: Path, capsys, damage: str) -> None:
    harm, expected = DAMAGE[damage]
    harm(copy)
    code = export_main([str(copy), "--out", str(tmp_path / "out.json")])
    one_line(capsys, code, "nmsearch export: ", expected)
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("damage", ["trials_cut_at_line", "trials_cut_mid_line", "result_truncated"])
def test_compare_refuses_damaged_result_files(copy: Path, tmp_path: Path, capsys, damage: str) -> None:
    harm, expected = DAMAGE[damage]
    harm(copy)
    code = compare_main([str(copy), "--out", str(tmp_path / "cmp")])
    one_line(capsys, code, "nmsearch compare: ", expected)
    assert not (tmp_path / "cmp").exists()


EXPORT_ARGS = {
    "min_accuracy_percent": (["--min-accuracy", "97"], "a fraction in [0, 1]"),
    "unknown_objective": (["--min-accuracy", "0.1", "--objective", "flops"], "unknown objective 'flops'"),
    "bad_constraint": (["--constraint", "accuracy=0.9"], "invalid constraint"),
    "unknown_metric": (["--constraint", "flops<=3"], "constraint on 'flops'"),
    "unreachable": (["--min-accuracy", "1.0", "--constraint", "latency_ms<=0.0001"], "no Pareto point satisfies"),
    "knee_and_bound": (["--knee", "--constraint", "accuracy>=0.1"], "--knee cannot be combined"),
    "knee_and_objective": (["--knee", "--objective", "accuracy"], "--knee cannot be combined"),
    "missing_out": ([], "--out"),
}


@pytest.mark.parametrize("case", list(EXPORT_ARGS))
def test_export_bad_requests_are_one_line(finished: Path, tmp_path: Path, capsys, case: str) -> None:
    args, expected = EXPORT_ARGS[case]
    out = [] if case == "missing_out" else ["--out", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit) as exit_info:
        code = export_main([str(finished), *args, *out])
        raise SystemExit(code)
    one_line(capsys, exit_info.value.code, expected)
    assert not (tmp_path / "x.json").exists()


def test_export_output_paths(finished: Path, tmp_path: Path, capsys) -> None:
    readonly = readonly_folder(tmp_path)
    one_line(capsys, export_main([str(finished), "--out", str(readonly / "s.json")]), "--out folder", "not writable")
    one_line(capsys, export_main([str(finished), "--out", str(tmp_path)]), "is a directory")
    (tmp_path / "file").write_text("x")
    one_line(capsys, export_main([str(finished), "--out", str(tmp_path / "file" / "s.json")]), "is a file")
    one_line(capsys, export_main([str(tmp_path / "nope"), "--out", str(tmp_path / "s.json")]), "holds no finished")
    one_line(capsys, export_main([str(finished.parent), "--out", str(tmp_path / "s.json")]), "a multirun")


def test_export_nearly_full_disk_is_refused(finished: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 10_000))
    one_line(capsys, export_main([str(finished), "--out", str(tmp_path / "s.json")]), "0.0 MB free", "free space")


def test_compare_bad_requests_are_one_line(finished: Path, tmp_path: Path, capsys) -> None:
    readonly = readonly_folder(tmp_path)
    one_line(capsys, compare_main([str(finished), "--out", str(readonly / "c")]), "not writable")
    (tmp_path / "file").write_text("x")
    one_line(capsys, compare_main([str(finished), "--out", str(tmp_path / "file")]), "is a file")
    one_line(capsys, compare_main([str(finished), "--x", "flops", "--out", str(tmp_path / "c")]), "--x 'flops'")
    one_line(capsys, compare_main([str(tmp_path / "nope"), "--out", str(tmp_path / "c")]), "is not a directory")


# -- the main job's outputs: the front, the figure, the summary ----------------------------------
def test_front_holds_distinct_schemes_with_repeats_linked(finished: Path) -> None:
    trials = SearchResult.load(finished).trials
    for row in trials[trials["duplicate_of"].notna()].itertuples():
        first = trials.set_index("trial").loc[int(row.duplicate_of)]
        assert first["scheme"] == row.scheme and row.duplicate_of < row.trial
    space = toy_space()
    evaluator = ToyEvaluator(space)
    schemes = list(space.uniform_schemes().values())
    candidates = [  # every scheme evaluated twice (reuse off, or two workers): one front point each
        Candidate(trial, scheme, evaluator.evaluate(scheme)) for trial, scheme in enumerate(schemes + schemes)
    ]
    result = SearchResult.from_candidates("optuna", evaluator.objectives, candidates)
    assert result.front["scheme"].is_unique and (result.front["trial"] < len(schemes)).all()
    repeats = result.trials[result.trials["trial"] >= len(schemes)]
    assert (repeats["duplicate_of"] == repeats["trial"] - len(schemes)).all()


def test_pareto_png_marks_the_choice_and_baselines(finished: Path, cache: Path) -> None:
    from experiments.search import build_space

    result = SearchResult.load(finished)
    _, space = build_space(config(cache, *FAST))
    chosen = result.knee()
    figure = plot_result(result, "t", chosen=chosen, space=space)
    labels = {
        text.get_text() for ax in figure.axes for text in (ax.get_legend().get_texts() if ax.get_legend() else [])
    }
    assert {"dense", "uniform", f"scheme.json (trial {chosen})"} <= labels
    notes = [t.get_text() for ax in figure.axes for t in ax.texts]
    spread = result.completed["latency_ms"]
    tiny = (spread.max() - spread.min()) / spread.max() < 0.02
    assert any("no real trade-off" in n for n in notes) == tiny  # the synthetic task's latency barely moves
    axes = [child for ax in figure.axes for child in [ax, *ax.child_axes]]
    assert any("speed-up over dense" in ax.get_xlabel() for ax in axes)


def test_summary_shows_each_layers_option(finished: Path) -> None:
    result = SearchResult.load(finished)
    text = summary(result, result.knee(), finished)
    assert "layers: features.0, features.3, classifier" in text
    first = result.front.iloc[0]
    assert " ".join(json.loads(first["scheme"]).values()) in text
    assert Scheme.from_choices({"a": "w2:4", "b": "w1:8", "c": "dense"}).summary() == "1 dense, 1 w1:8, 1 w2:4"


# -- the user-evaluator contract ---------------------------------------------------------------
class _Evaluator:
    def __init__(self, objectives, result=None, raise_on: str | None = None):
        self.objectives, self.result, self.raise_on = objectives, result, raise_on

    def evaluate(self, scheme):
        if self.raise_on and any(self.raise_on in o for o in scheme.choices.values()):
            raise RuntimeError(f"CUDA out of memory on {self.raise_on}\nsecond line")
        return self.result if self.result is not None else Evaluation({"accuracy": 0.5})


@pytest.mark.parametrize(
    ("evaluator", "expected"),
    [
        (_Evaluator(["accuracy"]), "must be a non-empty tuple of evaluators.Objective, got list"),
        (_Evaluator([Objective("accuracy", "maximize")]), "must be a non-empty tuple"),
        (_Evaluator(("accuracy",)), "write Objective('accuracy', 'maximize')"),
        (_Evaluator(({"name": "accuracy"},)), "must hold evaluators.Objective, got dict"),
        (_Evaluator(()), "non-empty tuple"),
        (_Evaluator((Objective("a", "maximize"), Objective("a", "minimize"))), "names 'a' twice"),
        (object(), "has no evaluate(scheme) method"),
    ],
    ids=["list-of-str", "list-of-objective", "tuple-of-str", "dicts", "empty", "duplicate", "no-evaluate"],
)
def test_bad_evaluators_are_refused_before_the_search(tmp_path: Path, evaluator, expected: str) -> None:
    with pytest.raises(EvaluatorError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_evaluator(evaluator)
    with pytest.raises(EvaluatorError):
        OptunaStrategy(n_trials=2).search(toy_space(), evaluator, run_dir=tmp_path)
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.parametrize(
    "strategy", [GumbelStrategy(epochs=1), DominoStrategy(), UniformStrategy()], ids=lambda s: s.name
)
def test_every_strategy_checks_the_evaluator_before_training(strategy) -> None:
    with pytest.raises(EvaluatorError, match="must be a non-empty tuple"):
        strategy.search(toy_space(), _Evaluator(["accuracy"]))


def test_evaluate_returning_a_dict_stops_with_one_line(tmp_path: Path) -> None:
    evaluator = _Evaluator((Objective("accuracy", "maximize"),), result={"accuracy": 0.5})
    with pytest.raises(EvaluatorError, match=r"returned dict .*not an evaluators\.Evaluation"):
        OptunaStrategy(n_trials=2, warm_start=False).search(toy_space(), evaluator)
    missing = _Evaluator((Objective("accuracy", "maximize"), Objective("x", "minimize")))
    with pytest.raises(EvaluatorError, match="no value for objective 'x'"):
        evaluate_safely(missing, Scheme.dense(toy_space()))


class _RaisingToy(ToyEvaluator):
    """The toy evaluator, raising (as a user model running out of memory would) on 1:8 activations."""

    def evaluate(self, scheme: Scheme) -> Evaluation:
        if any("a1:8" in option for option in scheme.choices.values()):
            raise RuntimeError("CUDA out of memory on a1:8\nsecond line")
        return super().evaluate(scheme)


def test_an_exception_in_the_evaluator_fails_only_that_trial(tmp_path: Path) -> None:
    space = toy_space()
    result = OptunaStrategy(n_trials=14, sampler="random", seed=0).search(space, _RaisingToy(space), run_dir=tmp_path)
    failed = result.trials[result.trials["state"] == "FAIL"]
    assert len(failed) >= 1 and not result.completed.empty
    assert (result.trials["state"] == "COMPLETE").sum() + len(failed) >= 14
    assert failed["reason"].str.contains("_RaisingToy.evaluate raised RuntimeError: CUDA out of memory on a1:8").all()
    assert not failed["reason"].str.contains("second line").any()


def test_cost_evaluator_metrics_are_never_dropped_or_split() -> None:
    space = toy_space()
    model = HardwareCostModel.from_profile("a100")
    assert [o.name for o in CostEvaluator(space, model, metrics="latency_ms").objectives] == ["latency_ms"]
    with pytest.raises(NMSearchError, match="listed twice"):
        CostEvaluator(space, model, metrics=("latency_ms", "latency_ms"))
    with pytest.raises(NMSearchError, match="unknown cost metric 'latency'"):
        CostEvaluator(space, model, metrics=("latency",))
    result = OptunaStrategy(n_trials=3, warm_start=False).search(space, CompositeEvaluator(ToyEvaluator(space)))
    assert [o.name for o in result.objectives] == ["accuracy", "latency_ms", "bytes_mb"]  # bytes_mb kept


# -- early checks before any work ----------------------------------------------------------------
def test_trainer_refuses_unavailable_devices_and_unwritable_caches(tmp_path: Path) -> None:
    task = get_task("synthetic")
    if not torch.cuda.is_available():
        with pytest.raises(TaskError, match="device='cuda', but this torch build has no CUDA"):
            Trainer(task, device="cuda", cache_dir=tmp_path)
    with pytest.raises(TaskError, match="not a torch device"):
        Trainer(task, device="gpu0", cache_dir=tmp_path)
    with pytest.raises(OutputDirError, match=r"pre-training cache .* not writable"):
        Trainer(task, device="cpu", cache_dir=readonly_folder(tmp_path) / "cache")


def test_pretraining_cache_key_holds_only_what_pretraining_uses(tmp_path: Path) -> None:
    key = Trainer(get_task("synthetic"), cache_dir=tmp_path).cache_key
    assert Trainer(get_task("synthetic", schedule={"finetune_lr": 0.5}), cache_dir=tmp_path).cache_key == key
    assert Trainer(get_task("synthetic", schedule={"eval_batch_size": 7}), cache_dir=tmp_path).cache_key == key
    assert Trainer(get_task("synthetic", schedule={"lr": 0.5}), cache_dir=tmp_path).cache_key != key
    assert Trainer(get_task("synthetic"), seed=1, cache_dir=tmp_path).cache_key != key


def test_check_writable_dir_creates_nothing_and_measures_free_space(tmp_path: Path, monkeypatch) -> None:
    assert check_writable_dir(tmp_path / "a" / "b", "run directory", "fix") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 3_000_000))
    with pytest.raises(OutputDirError, match=r"only 3\.0 MB free"):
        check_writable_dir(tmp_path, "run directory", "fix")


# -- one line for environment failures --------------------------------------------------------------
def test_full_disk_is_reported_as_a_full_disk() -> None:
    assert error_line(OSError(errno.ENOSPC, "No space left on device", "/r/trials.csv")) == (
        "cannot access '/r/trials.csv': no space left on device"
    )
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as cause:
            raise StorageInternalError(
                "An exception is raised during the commit. e.g. exceeding max length."
            ) from cause
    except StorageInternalError as error:
        line = error_line(error)
    assert line == "the Optuna storage could not be written: no space left on device"
    assert "exceeding max length" not in line
    assert error_line(OSError(errno.EROFS, "x", "/r")) == "cannot access '/r': read-only file system"
    assert error_line(KeyError("bug")) is None  # a bug keeps its traceback


def test_full_disk_while_writing_outputs_is_one_line(finished: Path, cache: Path, tmp_path: Path, capsys,
                                                     monkeypatch) -> None:  # fmt: skip
    import experiments.search as search

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    monkeypatch.setattr(search, "atomic_write", full)
    code = run_cli("nmsearch", lambda: search.run(config(cache, *FAST), out) and 0)
    one_line(capsys, code, "no space left on device", "pareto.png")


def test_ctrl_c_is_one_line_with_the_resume_hint(capsys) -> None:
    def body() -> int:
        raise KeyboardInterrupt

    code = run_cli("nmsearch", body, on_interrupt="run it again to resume")
    assert code == INTERRUPTED and USAGE != INTERRUPTED
    one_line(capsys, code, "interrupted; run it again to resume")


# -- the Python API --------------------------------------------------------------------------------
def test_scheme_load_on_binary_garbage(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_bytes(os.urandom(64) + b"\xff")
    with pytest.raises(SchemeError, match="is not a JSON text file"):
        Scheme.load(tmp_path / "s.json")
    with pytest.raises(SchemeError, match="cannot be read"):
        Scheme.load(tmp_path)


def test_from_model_names_a_wrong_example_shape() -> None:
    with pytest.raises(NMSearchError, match=r"Sequential cannot run on the example inputs \(shape \(2, 3, 8, 8\)\)"):
        SearchSpace.from_model(toy_model(), torch.randn(2, 3, 8, 8))
    named = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 8)))
    with pytest.raises(NMSearchError, match="include pattern 'fc2' matches no layer; did you mean 'fc1'"):
        SearchSpace.from_model(named, torch.randn(1, 8), include=["fc2"])
    with pytest.raises(NMSearchError, match="exclude pattern 'Conv3d' matches no layer"):
        SearchSpace.from_model(nn.Sequential(nn.Linear(8, 8)), torch.randn(1, 8), exclude=["Conv3d"])


@pytest.mark.slow
def test_processes_creating_one_sqlite_study_at_once_all_succeed(tmp_path: Path) -> None:
    """Losers of the table-creation race retry (strategies.storage.open_storage) instead of failing."""
    code = (
        "import sys, time\nfrom strategies.storage import open_storage\nimport optuna\n"
        "t = float(sys.argv[2])\nwhile time.time() < t: pass\n"
        "optuna.create_study(storage=open_storage('sqlite:///' + sys.argv[1]), study_name='s',"
        " directions=['maximize'], load_if_exists=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for attempt in range(3):
        db = tmp_path / f"race{attempt}.db"
        start = f"{__import__('time').time() + 6}"
        workers = [subprocess.Popen([sys.executable, "-c", code, str(db), start], env=env, stderr=subprocess.PIPE,
                                    text=True) for _ in range(4)]  # fmt: skip
        for worker in workers:
            _, err = worker.communicate(timeout=300)
            assert worker.returncode == 0, err[-2000:]


@pytest.mark.slow
def test_notebook_runs_from_its_own_folder_on_a_domino_run(tmp_path: Path, cache: Path, monkeypatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    out = tmp_path / "domino"
    run(config(cache, "task=synthetic", "strategy=domino"), out)  # fmt: skip
    notebook = nbformat.read(ROOT / "experiments" / "notebooks" / "pareto.ipynb", as_version=4)
    monkeypatch.setenv("NMSEARCH_RUN", str(out))
    folder = ROOT / "experiments" / "notebooks"
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()  # fmt: skip
