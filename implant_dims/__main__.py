"""`python -m implant_dims`: this package is a placeholder until its issue is opened; it has no stages yet."""

import sys

print("implant_dims: no stages yet (placeholder package; see implant_dims/README.md)")
sys.exit(0)
