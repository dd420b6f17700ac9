"""attar distill: teacher trajectories, student training and evaluation (needs attar[distill])."""
