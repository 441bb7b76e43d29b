from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from search_space import RecipeConfig, RecipeConfigError

RECIPE_DIR = Path(__file__).resolve().parents[2] / "conf" / "recipe"


def load(path: Path) -> RecipeConfig:
    merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.load(path))
    return RecipeConfig(**OmegaConf.to_container(merged))


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_file_is_a_valid_recipe(path: Path) -> None:
    config = load(path)
    assert config.estimator in ("ste", "srste", "fixed")


def test_recipe_group_covers_every_recipe() -> None:
    configs = {path.stem: load(path) for path in RECIPE_DIR.glob("*.yaml")}
    assert configs["srste"].srste_lambda == 2e-4
    assert configs["mask_decay"].decay == "mask" and configs["structure_decay"].decay == "structure"
    assert configs["fixed"].estimator == "fixed" and configs["ste"].estimator == "ste"


def test_typo_and_invalid_combination_fail_fast(tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("estimatr: ste\n")
    with pytest.raises(ConfigKeyError, match="estimatr"):
        load(typo)
    bad = tmp_path / "bad.yaml"
    bad.write_text("estimator: srste\ndecay: mask\n")
    with pytest.raises(RecipeConfigError, match="cannot be combined"):
        load(bad)
