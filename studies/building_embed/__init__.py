"""Studies of building_embed: the ORL faces experiments behind its results tables."""
