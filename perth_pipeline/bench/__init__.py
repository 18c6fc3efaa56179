"""``perth-pipeline bench``: the pipeline measured beside the naive design and this machine's ceiling.

The command is :data:`perth_pipeline.commands.bench.bench_command`; ``docs/benchmarks.md`` explains the
cases, shows a run and what it found.
"""
