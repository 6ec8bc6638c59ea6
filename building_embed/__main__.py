"""`python -m building_embed`: this package is a placeholder until its issue is opened; it has no stages yet."""

import sys

print("building_embed: no stages yet (placeholder package; see building_embed/README.md)")
sys.exit(0)
