"""nmsearch's Hydra configs and hardware profiles, shipped as the package data of ``nmsearch.conf``."""
