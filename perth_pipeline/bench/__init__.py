"""``perth-pipeline bench``: the pipeline measured beside the naive design and this machine's ceiling.

The command is :data:`benchmarks.harness.bench_command`; ``benchmarks/README.md`` explains the
cases, shows a run and what it found.
"""
