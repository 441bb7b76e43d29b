"""How the search space is explored (strategies import search_space, never the reverse)."""
