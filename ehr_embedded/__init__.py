"""ehr_embedded: medical events -> sentence-transformer code embeddings -> transformer encoder/decoder.

MEDS in (events, codes, splits, labels), MEDS evaluation predictions out. See ehr_embedded/README.md.
"""

__version__ = "0.1.0"
