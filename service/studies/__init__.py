"""The studies resource: grids of experiments over spec fields (issue 13)."""
