"""Studies of implant_dims: the commands that reproduce its results tables on the sample and shared data."""
