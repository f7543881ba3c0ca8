"""fitflow's benchmarks: every number is a ratio against a baseline run in the same process.

`python -m benchmarks` runs them all (about 10 minutes on 2 cores), prints a table and writes
JSON to benchmarks/results/; `python -m benchmarks --smoke` is the quick mode CI runs.
"""
