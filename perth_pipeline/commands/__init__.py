"""The command line's commands that live outside ``perth_pipeline/cli.py``, one module each.

Only this package and ``cli.py`` import click; each module turns the library's errors into
one line and an exit code (:func:`perth_pipeline.commands.common.fail`).
"""
