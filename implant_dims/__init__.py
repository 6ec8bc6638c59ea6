"""implant_dims: dental implant length and diameter (mm) from radiographs. Placeholder until its issue lands."""
