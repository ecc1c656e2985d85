"""TINY growth: statistics, the paper's closed-form updates, baselines, amplitude search, policy."""
