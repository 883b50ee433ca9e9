"""Tests that submit the project's SLURM job scripts to a throw-away SLURM cluster on this machine."""
