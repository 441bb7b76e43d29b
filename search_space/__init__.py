"""What a candidate is: N:M masks, sparse layer wrappers and gradient recipes."""

from search_space.layers import (
    MaskState,
    SparseConv2d,
    SparseLayerMixin,
    SparseLinear,
    calibrate_input_norms,
    set_submodule,
    sparse_layers,
    sparsify,
)
from search_space.masks import (
    activation_nm_mask,
    activation_weighted_scores,
    input_column_sq_sums,
    nm_mask,
    weight_column_norms,
    weight_nm_mask,
)
from search_space.patterns import (
    IneligibleLayerError,
    InvalidPatternError,
    NMPattern,
    NMSearchError,
    valid_m_values,
)
from search_space.recipes import (
    Recipe,
    RecipeConfig,
    RecipeConfigError,
    mask_decay_beta,
    mask_flip_frame,
    structure_decay_stage,
    structure_decay_stages,
)

__all__ = [
    "IneligibleLayerError",
    "InvalidPatternError",
    "MaskState",
    "NMPattern",
    "NMSearchError",
    "Recipe",
    "RecipeConfig",
    "RecipeConfigError",
    "SparseConv2d",
    "SparseLayerMixin",
    "SparseLinear",
    "activation_nm_mask",
    "activation_weighted_scores",
    "calibrate_input_norms",
    "input_column_sq_sums",
    "mask_decay_beta",
    "mask_flip_frame",
    "nm_mask",
    "set_submodule",
    "sparse_layers",
    "sparsify",
    "structure_decay_stage",
    "structure_decay_stages",
    "valid_m_values",
    "weight_column_norms",
    "weight_nm_mask",
]
