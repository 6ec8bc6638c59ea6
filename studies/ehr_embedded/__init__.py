"""ehr_embedded studies: the MIMIC-IV demo and sample-data tables, ablations, and the per-subject stage-1 oracle."""
