"""cnc_gcode: sensor windows of a CNC mill -> BiLSTM encoder -> multi-head transformer decoder -> G-code.

Stages: `python -m cnc_gcode` lists them. See cnc_gcode/README.md.
"""
