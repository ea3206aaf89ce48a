"""Subcommands of ``npflux`` beyond the core ones in ``npflux.cli``.

Each module here defines ``add_parsers(subparsers)``, which adds its
commands with ``set_defaults(func=...)``; ``npflux.cli.build_parser`` finds
the modules by name, so a feature's command line lives beside nothing else.
Heavy imports belong inside the command functions, not at module level, so
``npflux --help`` stays fast.
"""
import importlib
import pkgutil


def add_all(subparsers):
    """Let every module in this package add its subcommands, in name order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.add_parsers(subparsers)
