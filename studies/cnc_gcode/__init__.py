"""cnc_gcode studies: the tables of studies/cnc_gcode/RESULTS.md (measured channels, ablations, UMich logs)."""
