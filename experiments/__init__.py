"""Experiment files (`+experiment=<name>`), shipped with the package."""
