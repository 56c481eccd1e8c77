"""How good, how big, how fast: evaluation, timing, profiles, and their tables and figures."""
