"""Hardware-in-the-loop tests: each skips with a reason when its hardware is absent."""
