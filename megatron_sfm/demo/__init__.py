"""``sfm demo``: the whole experiment, end to end, on CPU in minutes, with embedded data."""
