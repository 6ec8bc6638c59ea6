"""Studies: the scripts and modules that reproduce the packages' measured tables on particular data sets, ablations,
and oracles kept for benchmarks and tests. Run from the repository root: `python -m studies.<package>.<study>`."""
