"""implant_dims: dental implant length and diameter (mm) from radiographs with company and model-type embeddings."""
