"""The `kvblend` command line: one typer app, one module per command group."""
import logging

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fast RAG answers from blended, precomputed chunk KV caches.")
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

from kvblend.cli import bench, corpus, demo, evaluate, generate, models, serve, store  # noqa: E402,F401  (each module registers its commands)
