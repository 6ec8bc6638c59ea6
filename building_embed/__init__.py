"""building_embed: building re-identification embeddings. Placeholder until its issue lands."""
